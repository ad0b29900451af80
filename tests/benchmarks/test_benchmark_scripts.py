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
