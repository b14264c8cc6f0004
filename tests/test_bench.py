"""`make bench` in its quick mode, so it cannot rot: every figure present, finite, positive,
and the ones with a derivation of their own (the model's size and flops, the images, the
losses its loops reach) right. Speed itself is measured by `make bench`, never asserted here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{prefix}{k}.")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix.rstrip("."), tree


# The reference model, 784-400-20: its Linear layers as (inputs, outputs).
LAYERS = [(784, 400), (400, 2 * 20), (20, 400), (400, 784)]
QUICK_IMAGES, BATCH = 2048, 128  # --quick trains on the first 2,048 images


@pytest.mark.timeout(1800)  # a hang guard only: about 2 minutes on 2 cores
def test_bench_quick_writes_every_figure(data_root, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "study.bench", "--quick", "--device", "cpu",
         "--data-root", str(data_root), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=1500, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in ("seconds_per_epoch", "images_per_second", "speedup_vs_baseline",
                "achieved_gflops", "matmul_peak_gflops", "fraction_of_peak", "test_nelbo",
                "tracking", "iwae_eval", "trials_per_hour", "machine"):
        assert key in result, key
    numbers = dict(_numbers(result))
    for key in ("seconds_per_epoch.ours", "seconds_per_epoch.ours_compiled",
                "seconds_per_epoch.baseline", "seconds_per_epoch.baseline_flushed",
                "fraction_of_peak_compiled", "speedup_compiled_vs_baseline_flushed",
                "fraction_of_best_peak_compiled",
                "test_nelbo.ours_compiled", "model_gemm_gflops",
                "images_per_second.ours", "matmul_peak_gflops", "achieved_gflops",
                "test_nelbo.ours", "test_nelbo.baseline", "tracking.tracking_overhead_pct",
                "iwae_eval.images_per_second", "trials_per_hour.jobs_1", "trials_per_hour.jobs_2",
                "step_breakdown.step_ms", "matmul_peak_gflops_one_thread", "step_breakdown.gemm_ms",
                "step_breakdown.forward_backward_ms", "step_breakdown.loop_ms"):
        assert math.isfinite(numbers[key]) and numbers[key] > 0, (key, numbers[key])
    parts = result["step_breakdown"]  # differences of timings: finite, of either sign if noisy
    assert all(math.isfinite(v) for v in parts.values()), parts
    assert parts["parameters"] == sum((n_in + 1) * n_out for n_in, n_out in LAYERS)
    # Matmul flops per image, 2 per multiply-add: the forward pass, the weight gradients, and
    # the input gradients of every layer but the first (the images need none).
    macs = sum(n_in * n_out for n_in, n_out in LAYERS)
    flops = 2 * macs + 2 * macs + 2 * (macs - LAYERS[0][0] * LAYERS[0][1])
    assert result["training_gflop_per_image"] * 1e9 == pytest.approx(flops, rel=1e-12)
    assert result["train_images"] == QUICK_IMAGES
    assert parts["steps_timed"] == math.ceil(QUICK_IMAGES / BATCH)
    for loop, seconds in result["seconds_per_epoch"].items():
        assert result["images_per_second"][loop] * seconds == pytest.approx(QUICK_IMAGES)
    # The loops train the same model from the same initialization with the same Adam on the
    # same images; only shuffling and noise differ, whose seeds spread the test nelbo by about
    # a nat here. Each beats a decoder that says 1/2 for every pixel (784 log 2 = 543 nats,
    # whatever the image), and they agree within 5%: a loop that optimizes another objective,
    # or trains less, ends tens to hundreds of nats away.
    nelbo = result["test_nelbo"]
    assert nelbo["epochs_each"] == 2  # a warm-up epoch and the measured one
    for loop in ("ours", "ours_compiled", "baseline"):
        assert nelbo[loop] < LAYERS[0][0] * math.log(2)
        assert nelbo[loop] == pytest.approx(nelbo["baseline"], rel=0.05), nelbo
    assert "speed-up" in proc.stdout and "MLflow tracking overhead" in proc.stdout
    assert "one eager step (best of 2 passes over 16 steps), ms:" in proc.stdout  # 2,048 images
