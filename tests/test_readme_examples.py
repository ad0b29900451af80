"""The README's Python examples run as written (each follows a ``<!-- readme-example: NAME -->`` line)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    m = re.search(rf"<!-- readme-example: {re.escape(name)}\b.*?-->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no example {name!r}"
    return m.group(1)


def run_example(name: str, cwd: Path, env_extra: dict | None = None) -> str:
    import os

    env = {**os.environ, **(env_extra or {}), "PYTHONPATH": str(README.parent)}
    proc = subprocess.run([sys.executable, "-c", example(name)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_own_dataset_example(tmp_path):
    out = run_example("own-dataset", tmp_path)
    assert out.split() == ["runs/mine", "64"]
    assert (tmp_path / "runs/mine/checkpoint.pt").is_file() and (tmp_path / "runs/mine/config.yaml").is_file()


@pytest.mark.parametrize("item", ["pil", "tensor_chw", "gray_ndarray", "float_tensor", "tuple_with_label"])
def test_python_images_accepts_every_documented_item(item):
    import numpy as np
    import torch
    from PIL import Image

    from bcssl.data.multicrop import MultiCropConfig
    from bcssl.data.python_dataset import PythonImages

    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    items = {"pil": Image.fromarray(hwc), "tensor_chw": torch.from_numpy(hwc).permute(2, 0, 1),
             "gray_ndarray": hwc[..., 0], "float_tensor": torch.from_numpy(hwc).permute(2, 0, 1).float() / 255,
             "tuple_with_label": (Image.fromarray(hwc), 7)}
    ds = PythonImages([items[item]])
    crop = ds.crop_item(0, seed=1, cfg=MultiCropConfig(global_size=16, local_size=8, n_local=2))
    assert crop.size == (50, 30) and [tuple(g.shape) for g in crop.groups] == [(2, 3, 16, 16), (2, 3, 8, 8)]
    assert crop.label == (7 if item == "tuple_with_label" else -1)
    image, _ = ds[0]
    want = hwc if item != "gray_ndarray" else np.repeat(hwc[..., :1], 3, axis=2)
    assert torch.equal(image, torch.from_numpy(want).permute(2, 0, 1))  # the pixels as given (floats round back)


def test_python_images_names_the_bad_item():
    from bcssl.data.python_dataset import PythonImages

    with pytest.raises(TypeError, match=r"train_set\[0\] \(list\) returned str; expected a PIL image"):
        PythonImages(["not an image"])
    with pytest.raises(TypeError, match=r"shape \(4, 5, 6, 7\)"):
        PythonImages([__import__("numpy").zeros((4, 5, 6, 7), "uint8")])
    with pytest.raises(ValueError, match="train_set is empty"):
        PythonImages([])


def test_webdataset_example(tmp_path):
    out = run_example("webdataset", tmp_path)
    assert out.split() == ["64"]
    assert len(list(tmp_path.glob("train-*.tar"))) == 4 and (tmp_path / "runs/shards/checkpoint.pt").is_file()
