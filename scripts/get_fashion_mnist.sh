#!/bin/sh
# Make sure the Fashion-MNIST IDX files are present: $BCSSL_FMNIST_DIR, the Debian package
# dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), or ./data/fashion-mnist.
set -u
PYTHON=${PYTHON:-python3}
have() { [ -n "$1" ] && [ -f "$1/train-images-idx3-ubyte.gz" -o -f "$1/train-images-idx3-ubyte" ]; }
for d in "${BCSSL_FMNIST_DIR:-}" /usr/share/datasets/fashion-mnist ./data/fashion-mnist; do
  if have "$d"; then echo "Fashion-MNIST: $d"; exit 0; fi
done
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"
  if $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
     { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; then
    have /usr/share/datasets/fashion-mnist && { echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; exit 0; }
  fi
fi
echo "Fashion-MNIST: downloading with torchvision into ./data/fashion-mnist"
if "$PYTHON" - <<'PY'
import shutil, pathlib
from torchvision.datasets import FashionMNIST
root = pathlib.Path("data/fashion-mnist")
for train in (True, False):
    FashionMNIST(str(root / "tv"), train=train, download=True)
for f in (root / "tv" / "FashionMNIST" / "raw").glob("*.gz"):
    shutil.copy(f, root / f.name)
PY
then have ./data/fashion-mnist && exit 0; fi
echo "error: could not get Fashion-MNIST. Install the Debian package (sudo apt-get install dataset-fashion-mnist)" >&2
echo "       or put the four *-ubyte.gz files in ./data/fashion-mnist (or set BCSSL_FMNIST_DIR)." >&2
exit 1
