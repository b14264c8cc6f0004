"""study.evidence against values worked out by hand, and its JSON read back by analysis.evidence
(which the reports use without torch)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis.evidence import from_json
from study.evidence import (
    ERROR,
    MID_GREY,
    TARGETS,
    cost_of_an_error,
    data_evidence,
    loss_curves,
    write_evidence,
)


def test_the_cost_of_an_error_by_hand():
    rows = {r["target"]: r for r in cost_of_an_error(targets=(0.0, 0.5, 1.0), error=0.1)}
    # a black target predicted 0.1: BCE - H(0) = -log(0.9), the squared error 0.1^2
    assert rows[0.0]["prediction"] == pytest.approx(0.1)
    assert rows[0.0]["entropy_floor"] == pytest.approx(0.0, abs=1e-12)
    assert rows[0.0]["bce_excess"] == pytest.approx(-math.log(0.9), rel=1e-9)
    assert rows[0.0]["squared_error"] == pytest.approx(0.01, rel=1e-9)
    # x = 0.5, p = 0.6: -(0.5 log 0.6 + 0.5 log 0.4) - log 2, and the floor is log 2
    assert rows[0.5]["entropy_floor"] == pytest.approx(math.log(2), rel=1e-12)
    assert rows[0.5]["bce_excess"] == pytest.approx(
        -0.5 * math.log(0.6) - 0.5 * math.log(0.4) - math.log(2), rel=1e-9)
    assert rows[1.0]["prediction"] == pytest.approx(0.9)  # towards the middle, inside [0, 1]
    assert rows[1.0]["bce_excess"] == pytest.approx(rows[0.0]["bce_excess"], rel=1e-9)


def test_the_loss_curves_and_their_gradients_by_hand():
    curves = loss_curves(targets=(0.25,), points=9)
    bce = [r for r in curves if r["loss"] == "BCE − min"]
    sse = [r for r in curves if r["loss"] == "squared error"]
    assert len(bce) == len(sse) == 9
    for r in sse:
        assert r["value"] == pytest.approx((r["prediction"] - 0.25) ** 2, rel=1e-5, abs=1e-12)
        assert r["gradient"] == pytest.approx(2 * (r["prediction"] - 0.25), rel=1e-5, abs=1e-12)
    for r in bce:  # d/dp of -(x log p + (1-x) log(1-p)) = (p - x) / (p (1 - p))
        p = r["prediction"]
        assert r["gradient"] == pytest.approx((p - 0.25) / (p * (1 - p)), rel=1e-5, abs=1e-9)
    assert min(bce, key=lambda r: r["value"])["prediction"] == pytest.approx(0.2, abs=0.1)


def test_the_json_a_study_run_logs_reads_back_whole(data_root, tmp_path):
    path = write_evidence(("mnist",), data_root, tmp_path)
    doc = json.loads(path.read_text())
    assert doc == json.loads(json.dumps(data_evidence(("mnist",), data_root)))
    ev = from_json(doc)
    mnist = ev.pixels["mnist"]
    assert mnist.n_images == 60_000 and mnist.n_pixels == 784 and mnist.image_shape == (1, 28, 28)
    assert mnist.histogram.sum() == 60_000 * 784
    assert mnist.mean == pytest.approx((mnist.histogram * mnist.levels).sum() / mnist.histogram.sum())
    assert 0 < mnist.share_mid_grey < mnist.share_mid_grey_of_ink < 1
    # the floor lies between 0 (all pixels binary) and D log 2 (all pixels at 0.5)
    assert 0 < mnist.entropy_floor < 784 * math.log(2)
    assert set(ev.curves.columns) == {"target", "prediction", "loss", "value", "gradient"}
    # the constants the study computed with, carried through the JSON to the reports
    assert ev.targets == TARGETS and ev.error == ERROR and ev.mid_grey == MID_GREY
    assert np.isclose(ev.cost.set_index("target").loc[0.0, "squared_error"], ev.error ** 2)
