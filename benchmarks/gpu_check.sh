#!/usr/bin/env bash
# GPU check (issue 6): one prepared script for a CUDA machine, under 10 minutes in all.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; outputs in ${OUT:-gpu_check_out}/
#
# Steps, most important first; each has its own timeout and is skipped once the total budget
# (BUDGET seconds, default 570) is spent:
#   data       a small JPEG image folder (256 px) and a fake Fashion-MNIST, written under $OUT/data
#   decode     data.decode_on_device: nvJPEG batch decode + crops on the GPU vs PIL crops in workers
#   train_amp  training img/s of BC-SSL-T (DINO, 2x224 + 8x96 crops, batch 64) on ready crops:
#              fp32 vs bf16 vs fp16 (+ GradScaler), channels_last, fused AdamW; ratios to fp32
#   infer      inference img/s at 224, batch 128, fp16, channels_last: BC-SSL-T (BN folded) vs
#              Swin-T (paper, A100: 1777 vs 1326 img/s, BC-SSL-T +34%)
#   ddp        2 DDP steps of the demo config with torchrun, only when more than one GPU is present
#   train_e2e  training img/s end to end (crops cut in the workers -> photometric part on the GPU -> step) vs the
#              model on ready crops vs a PIL DataLoader reference (fp16, channels_last)
#   compile    the torch.compile (inductor) option row (compiling takes a minute or two)
# Then a summary (also $OUT/summary.json). Needs the repo's venv (.venv) or `pip install -e .`.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
BUDGET=${BUDGET:-570}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
if ! "$PY" -c "import bcssl" >/dev/null 2>&1; then
    echo "bcssl is not importable by $PY: installing it (pip install -e .)"
    "$PY" -m pip install -q -e .
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to PyTorch: this check needs a GPU" >&2
    exit 1
fi
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NGPU=${NGPU:-0}
{ nvidia-smi -L || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name())"; } | tee "$OUT/env.txt"

START=$SECONDS
STATUS_FILE="$OUT/status.txt"
: > "$STATUS_FILE"

# run_step NAME MAX_SECONDS CMD...: output in $OUT/NAME.log; never stops the script.
run_step() {
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 30)); then
        echo "== $name: skipped (${left}s of the budget left)"
        echo "$name skipped-budget 0" >> "$STATUS_FILE"
        return 0
    fi
    ((max > left)) && max=$left
    echo "== $name (timeout ${max}s)"
    local t0=$SECONDS rc=0
    timeout --kill-after=15 "$max" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    echo "$name rc=$rc $((SECONDS - t0))" >> "$STATUS_FILE"
    tail -n 12 "$OUT/$name.log"
    ((rc == 124)) && echo "   ($name timed out after ${max}s)"
    return 0
}

# --- data -------------------------------------------------------------------------------------
cat > "$OUT/make_data.py" <<'PYEOF'
"""A 2-class folder of smooth 256x320 JPEGs and a fake Fashion-MNIST (IDX files)."""
import gzip
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
for c in range(2):
    d = out / "imgs" / f"class{c}"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(200):
        low = torch.from_numpy(rng.integers(0, 256, (1, 3, 8, 10)).astype(np.float32))
        img = F.interpolate(low, size=(256, 320), mode="bilinear", align_corners=False)[0]
        Image.fromarray(img.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()).save(d / f"{i}.jpg", quality=90)
fm = out / "fmnist"
fm.mkdir(parents=True, exist_ok=True)
for prefix, n in (("train", 1024), ("t10k", 256)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 * y:2 * y + 4] = 200
    with gzip.open(fm / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">i4").tobytes() + images.tobytes())
    with gzip.open(fm / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([n], ">i4").tobytes() + labels.tobytes())
print("data in", out)
PYEOF
run_step data 60 "$PY" "$OUT/make_data.py" "$OUT/data"

# --- decode on the device -----------------------------------------------------------------------
cat > "$OUT/decode_check.py" <<'PYEOF'
"""data.decode_on_device (nvJPEG batch decode, crops cut on the GPU) vs the PIL workers: the same
boxes, crops equal up to rounding, and loader images/s of both (2x224 + 8x96, batch 64)."""
import json
import sys
import time

import torch

from bcssl.data import BatchLoader, ImageFolderDataset
from bcssl.data.multicrop import MultiCropConfig

root, cfg = sys.argv[1], MultiCropConfig()
def loader(device_decode):
    ds = ImageFolderDataset(root, decode_on_device=device_decode)
    return BatchLoader(ds, 64, seed=0, crops=cfg, workers=8, decode_device="cuda" if device_decode else "cpu")
rates, batches = {}, {}
for name, dev in (("gpu_decode", True), ("pil_workers", False)):
    it = loader(dev).epoch(0)
    first = next(it)
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = sum(len(b) for b in it)
    torch.cuda.synchronize()
    rates[name], batches[name] = n / (time.perf_counter() - t), first
a, b = batches["gpu_decode"], batches["pil_workers"]
diff = [(x.cpu().int() - y.int()).abs().float() for x, y in zip(a.groups, b.groups)]
res = {"same_boxes": bool(torch.equal(a.boxes, b.boxes)), "max_abs_diff": max(d.max().item() for d in diff),
       "mean_abs_diff": sum(d.mean().item() for d in diff) / len(diff),
       "gpu_decode_img_s": round(rates["gpu_decode"], 1), "pil_workers_img_s": round(rates["pil_workers"], 1)}
print(json.dumps(res))
PYEOF
run_step decode 60 "$PY" "$OUT/decode_check.py" "$OUT/data/imgs"

# --- training img/s: AMP and the other compute options -------------------------------------------
PAPER_T=(--config imagenet_bcssl_t_100ep "data.root=$OUT/data/imgs" data.workers=8 --device cuda --batch 64)
run_step train_amp 200 "$PY" benchmarks/train_throughput.py "${PAPER_T[@]}" --only-options \
    --options bf16,fp16,channels_last,channels_last+bf16,channels_last+fp16+fused \
    --warmup 2 --steps 3 --rounds 2 --json

# --- inference img/s: BC-SSL-T vs Swin-T at 224 ---------------------------------------------------
run_step infer 150 "$PY" -m bcssl bench throughput --models bcssl_t,swin_t --batch 128 --resolution 224 \
    --amp fp16 --channels-last --device cuda --warmup 5 --iters 20 --repeats 3 --json

# --- 2 DDP steps when there are several GPUs ------------------------------------------------------
if ((NGPU > 1)); then
    # demo_fmnist: 128 images per process; data.limit = 2 steps of the global batch of 2 x 128
    run_step ddp 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m bcssl pretrain \
        --config demo_fmnist "data.root=$OUT/data/fmnist" data.limit=512 train.epochs=1 \
        eval.final_knn=false eval.knn_every=0 train.progress=false "run.dir=$OUT/ddp_runs" --json
else
    echo "== ddp: skipped ($NGPU GPU)"
    echo "ddp skipped-one-gpu 0" >> "$STATUS_FILE"
fi

# --- end to end vs model only vs PIL reference ----------------------------------------------------
run_step train_e2e 150 "$PY" benchmarks/train_throughput.py "${PAPER_T[@]}" --workers 8 \
    --warmup 1 --steps 3 --rounds 2 --json

# --- torch.compile ---------------------------------------------------------------------------------
run_step compile 240 "$PY" benchmarks/train_throughput.py "${PAPER_T[@]}" --only-options \
    --options compile,channels_last+bf16+compile --warmup 3 --steps 3 --rounds 2 --json

# --- summary -----------------------------------------------------------------------------------------
"$PY" - "$OUT" <<'PYEOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def last_json(name):
    p = out / f"{name}.log"
    if not p.exists():
        return None
    for line in reversed(p.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


status = {}
for line in (out / "status.txt").read_text().splitlines():
    name, state, secs = line.split()
    status[name] = {"status": state, "seconds": int(secs)}
summary = {"status": status}
print("\n==== GPU check summary ====")
for name, s in status.items():
    print(f"  {name:10s} {s['status']:16s} {s['seconds']:4d} s")
dec = last_json("decode")
if dec:
    summary["decode"] = dec
    print(f"decode on device: same boxes {dec['same_boxes']}, crops max |diff| vs PIL {dec['max_abs_diff']:.0f}, mean "
          f"{dec['mean_abs_diff']:.2f}; loader {dec['gpu_decode_img_s']} img/s (GPU) vs {dec['pil_workers_img_s']} "
          "img/s (PIL, 8 workers)")
for name in ("train_amp", "compile"):
    res = last_json(name)
    if res and "options" in res:
        summary[name] = res
        print(f"training img/s, {res['model']}, batch {res['batch']}, crops {res['crops']}, ready crops:")
        for opt, row in res["options"].items():
            print(f"  {opt:28s} {row['img_s']:8.1f} img/s  {row['over_plain']:.3f}x fp32")
res = last_json("train_e2e")
if res and "bcssl_end_to_end_img_s" in res:
    summary["train_e2e"] = res
    print(f"end to end (amp {res['amp']}): {res['bcssl_end_to_end_img_s']} img/s = "
          f"{res['end_to_end_over_model_only']:.2f}x model only, {res['end_to_end_over_pil_reference']:.2f}x PIL reference")
res = last_json("infer")
if res and res.get("rows"):
    summary["infer"] = res
    rates = {r["model"]: r["img_per_s"] for r in res["rows"]}
    line = ", ".join(f"{m} {v:.0f} img/s" for m, v in rates.items())
    if "bcssl_t" in rates and "swin_t" in rates:
        line += f"; BC-SSL-T / Swin-T = {rates['bcssl_t'] / rates['swin_t']:.2f} (paper A100: 1777/1326 = 1.34)"
    print(f"inference at 224, batch 128, fp16: {line}")
res = last_json("ddp")
if res:
    summary["ddp"] = res
    print(f"DDP: {res.get('images_seen')} images over {res.get('world_size')} processes, {res.get('imgs_per_s', 0):.0f} img/s")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(f"outputs in {out}")
PYEOF
echo "total $((SECONDS - START)) s"
