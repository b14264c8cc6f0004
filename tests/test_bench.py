"""`make bench` in its quick mode, so it cannot rot: every figure present, finite, positive.
Speed itself is measured by `make bench`, never asserted here."""

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


def test_bench_quick_writes_every_figure(data_root, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "study.bench", "--quick", "--device", "cpu",
         "--data-root", str(data_root), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=False,
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
    assert parts["forward_backward_ms"] + parts["optimizer_ms"] + parts["gather_ms"] == \
        pytest.approx(parts["step_ms"])
    assert parts["parameters"] == 784 * 400 + 400 + 400 * 40 + 40 + 20 * 400 + 400 + 400 * 784 + 784
    # the flop count is the model's: 784-400-20 forward + backward is ~3.3 MFLOP per image
    assert 2.5e-3 < result["training_gflop_per_image"] < 4e-3
    assert "speed-up" in proc.stdout and "MLflow tracking overhead" in proc.stdout
    assert "one eager step (best of 2 passes over 16 steps), ms:" in proc.stdout  # 2,048 images
