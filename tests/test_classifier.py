"""The classifier behind the Frechet distance: its accuracy, its cache file (loaded once per
`Classifiers`, never rewritten), its features, and a study served by a read-only data
folder that holds the cached classifiers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    BETAS,
    DEADLINE_S,
    REPO,
    TARGET_ACCURACY,
    run_args,
    runner_env,
    three_betas,
    trial_runs,
)

from study import classifier, quality
from study.data import load_splits


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_classifier_accuracy_and_cache(data_root, dataset):
    loaded = classifier.Classifiers(data_root)
    first = loaded.get(dataset)
    assert first.test_accuracy >= TARGET_ACCURACY[dataset]
    assert loaded.get(dataset) is first  # each loaded once per Classifiers

    payload = torch.load(first.path, weights_only=True)
    assert payload["test_accuracy"] == first.test_accuracy
    assert payload["dataset"] == dataset
    mtime = first.path.stat().st_mtime_ns
    again = classifier.get_classifier(dataset, data_root)
    assert again is not first and not again.trained
    assert first.path.stat().st_mtime_ns == mtime

    test = load_splits(dataset, data_root).test
    for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # The stored accuracy was measured where the net was trained, maybe on another CPU kind,
    # whose summation order can flip only images whose two best logits nearly tie; 1e-3 is
    # over a hundred times what float32 rounding moves a logit of this net.
    with torch.no_grad():
        logits = torch.cat([again.net(x) for x in test.grey().split(1000)])
    best = logits.topk(2, dim=1).values
    ties = int((best[:, 0] - best[:, 1] < 1e-3).sum())
    measured = classifier.accuracy(again.net, test.grey(), test.labels)
    assert abs(measured - first.test_accuracy) <= ties / len(test)
    features = again.features(test.grey()[:10])
    assert features.shape == (10, classifier.DEFAULT_SETTINGS.feature_dim)


def test_classifier_features_separate_real_from_noisy_images(data_root, mnist_test):
    net = classifier.get_classifier("mnist", data_root)
    images = mnist_test.grey()
    half = len(images) // 2
    real_a, real_b = images[:half], images[half:]
    noise = torch.randn(real_b.shape, generator=torch.Generator().manual_seed(0))
    fd = {level: quality.frechet_distance(
              net.features(real_a).numpy(),
              net.features((real_b + level * noise).clamp(0, 1)).numpy())
          for level in (0.0, 0.2, 0.5)}
    assert 0 < fd[0.0] < fd[0.2] < fd[0.5]


def test_a_read_only_data_folder_serves_a_study(data_root, tmp_path):
    """The data folder (with its cached classifiers) mounted read-only, as a shared dataset
    volume would be: the study reads everything it needs and writes nothing there."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True, check=False).returncode:
        pytest.fail("this test needs `unshare -rm` (util-linux, user namespaces) to mount the "
                    "data folder read-only")
    spec, stores = three_betas(tmp_path), tmp_path / "stores"
    data = str(Path(data_root).resolve())
    script = (f'mount --bind "{data}" "{data}" && mount -o remount,bind,ro "{data}" && '
              f'touch "{data}/probe" 2>/dev/null && exit 99; exec "$@"')
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m",
                           "study.runner", *run_args(spec, stores)], cwd=REPO,
                          capture_output=True, text=True, timeout=DEADLINE_S, check=False,
                          env=runner_env({"VAE_DATA_ROOT": data}))
    assert done.returncode != 99, "the data folder was still writable"
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r.info.status for r in trial_runs(stores, "three")] == ["FINISHED"] * len(BETAS)
