"""The benchmark scripts run (tiny settings) and print their ratios, so they cannot rot unnoticed."""
import json
import os
import subprocess
import sys

from tests.conftest import TINY_CROPS, TINY_HEAD, TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_throughput_prints_ratios(tiny_fmnist):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "train_throughput.py"), "--steps", "1", "--rounds", "1", "--warmup", "1",
         "--batch", "8", "--workers", "0", "--threads", "1", "--json", f"data.root={tiny_fmnist}",
         *TINY_MODEL, *TINY_HEAD, *TINY_CROPS],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["end_to_end_over_model_only"] > 0 and result["end_to_end_over_pil_reference"] > 0
    assert "(a)/(b)" in out.stdout


def test_train_throughput_option_rows(tiny_fmnist):
    """--options rows run and are reported as ratios to the plain row (fp16 is skipped on the CPU)."""
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "train_throughput.py"), "--steps", "1", "--rounds", "1",
         "--warmup", "1", "--batch", "8", "--threads", "1", "--device", "cpu", "--only-options",
         "--options", "channels_last,compile,bf16,fp16,fused,channels_last+bf16,full_kernel", "--json",
         f"data.root={tiny_fmnist}", "train.compile_backend=aot_eager", *TINY_MODEL, *TINY_HEAD, *TINY_CROPS],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["options"]) == {"plain", "channels_last", "compile", "bf16", "fused", "channels_last+bf16",
                                      "full_kernel"}
    assert result["options"]["plain"]["over_plain"] == 1.0
    assert all(row["img_s"] > 0 and row["over_plain"] > 0 for row in result["options"].values())
    assert "bcssl_end_to_end_img_s" not in result  # --only-options: no (a)-(c)
    assert any(note.startswith("fp16") for note in result["options_skipped"])


def test_reference_loader_keeps_working_while_timed():
    """(c) must pay for its augmentation on the clock: its dataset outlasts the measured steps by
    the DataLoader's prefetch queue, and repeats the images to get there."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from train_throughput import PILDataset, reference_batches

    for measured, workers in [(5, 2), (2, 0), (9, 4)]:
        assert reference_batches(measured, workers) > measured + 2 * workers
    calls = []
    ds = PILDataset(torch.arange(3 * 4 * 4, dtype=torch.uint8).view(3, 1, 4, 4), calls.append, length=7)
    assert len(ds) == 7
    for i in range(7):
        ds[i]
    assert [c.getpixel((0, 0))[0] for c in calls] == [0, 16, 32, 0, 16, 32, 0]


def test_imagenet_like_prints_the_three_rates_and_ratios(tmp_path):
    """The ImageNet-like benchmark at toy scale: it writes its JPEG folder and reports (a), (b), (c)."""
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "imagenet_like.py"), "--out", str(tmp_path / "jpegs"),
         "--images", "12", "--side", "40,90", "--cases", "demo", "--batch-demo", "4", "--steps", "1", "--rounds", "1",
         "--workers", "1", "--threads", "1", "--data-rounds", "1", "crops.global_size=32", "crops.local_size=32",
         "crops.n_local=1",
         "method.dino.out_dim=64", "method.dino.hidden_dim=32", "method.dino.bottleneck_dim=16"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    demo = result["cases"]["demo"]
    assert demo["bcssl_end_to_end_img_s"] > 0 and demo["pil_reference_img_s"] > 0 and demo["crops"] == "2x32 + 1x32"
    assert len(list((tmp_path / "jpegs").glob("*.jpg"))) == 12 and "(a)/(c)" in out.stdout and result["cpu"]
    assert result["data_path_ms_per_image"]["dino_pil"] > 0 and "PIL / bcssl workers" in out.stdout
