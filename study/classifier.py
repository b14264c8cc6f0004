"""A small CNN classifier per dataset whose hidden features give the Frechet distance of
generated samples; trained once on the official train split and cached under the data folder.

The cache file `<data_root>/classifiers/<dataset>-<hash>.pt` holds a state_dict plus metadata
(test accuracy, settings) and loads with `torch.load(path, weights_only=True)`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from study.data import dataset_digest, load_splits


@dataclass(frozen=True)
class Settings:
    """Everything that decides the trained weights; its hash names the cache file."""

    channels: tuple[int, int] = (16, 32)
    """Output channels of the two 5x5 stride-2 conv layers."""
    feature_dim: int = 128
    """Width of the hidden fully connected layer whose activations are the features."""
    epochs: int = 4
    """Passes over the 60,000 official training images."""
    batch_size: int = 128
    """Images per Adam step."""
    lr: float = 2e-3
    """Starting Adam learning rate, cosine-annealed to 0 over all steps."""
    seed: int = 0
    """Seeds the initialization and the shuffling."""
    version: int = 2
    """Bump whenever SmallCNN or the training loop changes, so old cache files are not reused."""


DEFAULT_SETTINGS = Settings()
EVAL_BATCH = 1000
"""Images per batch when computing features or accuracy (memory bound, not a statistic)."""
KERNEL, STRIDE = 5, 2
"""Strided 5x5 convolutions halve H and W: on 2 CPU cores a third of the cost of
same-size convolutions followed by max-pooling, at the same accuracy."""


class SmallCNN(nn.Module):
    """Two strided conv-relu layers, a hidden FC layer, then relu and a linear head.

    The features are the hidden layer's pre-activations: after the ReLU about a third of the
    units are zero on every image, which would make the feature covariance singular.
    """

    def __init__(self, image_shape, n_classes: int, settings: Settings):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, w = self.image_shape
        c1, c2 = settings.channels
        pad = KERNEL // 2  # with stride 2: H -> ceil(H / 2)
        flat = c2 * _halved(_halved(h)) * _halved(_halved(w))
        self.body = nn.Sequential(
            nn.Conv2d(c, c1, KERNEL, stride=STRIDE, padding=pad), nn.ReLU(),
            nn.Conv2d(c1, c2, KERNEL, stride=STRIDE, padding=pad), nn.ReLU(),
            nn.Flatten(), nn.Linear(flat, settings.feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(settings.feature_dim, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (B, n_classes), for grey images (B, C, H, W) in [0, 1]."""
        return self.head(self.body(x))


def _halved(size: int) -> int:
    """Output size of one strided conv layer with `KERNEL // 2` padding."""
    return (size - 1) // STRIDE + 1


@dataclass
class Classifier:
    """A trained SmallCNN with its own test accuracy (on the full official test split)."""

    net: SmallCNN
    test_accuracy: float
    path: Path
    trained: bool
    """True when this process trained it, False when it came from the cache file."""
    settings: Settings = DEFAULT_SETTINGS

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Hidden-layer pre-activations (N, feature_dim), one row per grey image, in batches."""
        self.net.eval()
        return torch.cat([self.net.body(images[i:i + EVAL_BATCH])
                          for i in range(0, len(images), EVAL_BATCH)])


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose arg-max logit equals the label, over all images."""
    net.eval()
    correct = 0
    for i in range(0, len(images), EVAL_BATCH):
        correct += int((net(images[i:i + EVAL_BATCH]).argmax(1) == labels[i:i + EVAL_BATCH]).sum())
    return correct / len(images)


def cache_path(dataset: str, root, settings: Settings = DEFAULT_SETTINGS) -> Path:
    """`<root>/classifiers/<dataset>-<hash of settings and dataset digest>.pt`."""
    key = json.dumps({"settings": asdict(settings), "data": dataset_digest(dataset)}, sort_keys=True)
    short = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(root) / "classifiers" / f"{dataset}-{short}.pt"


def train_classifier(dataset: str, root, settings: Settings = DEFAULT_SETTINGS,
                     device: str = "cpu") -> tuple[SmallCNN, float]:
    """Fit a SmallCNN on all 60,000 official training images (grey) with Adam, a cosine
    learning-rate decay and the cross-entropy averaged over each batch; return it with its
    accuracy on the official test split.

    Seeded by `settings.seed` without touching the caller's global RNG; uses the torch
    thread count as inherited.
    """
    splits = load_splits(dataset, root, device=device)
    # load_splits carves a validation set from the official train split: take both back.
    x = torch.cat([splits.train.grey(), splits.val.grey()])
    y = torch.cat([splits.train.labels, splits.val.labels])
    n_classes = int(y.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = SmallCNN(splits.image_shape, n_classes, settings)
    net = net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    steps = settings.epochs * math.ceil(len(x) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.enable_grad():  # callers (quality_metrics) may be under no_grad
        _fit(net, optimizer, schedule, x, y, settings, gen, device)
    return net.eval(), accuracy(net, splits.test.grey(), splits.test.labels)


def _fit(net, optimizer, schedule, x, y, settings: Settings, gen, device) -> None:
    for _ in range(settings.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen).to(device)
        for i in range(0, len(x), settings.batch_size):
            idx = perm[i:i + settings.batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def get_classifier(dataset: str, root, device: str = "cpu",
                   settings: Settings = DEFAULT_SETTINGS) -> Classifier:
    """The dataset's classifier from its cache file, trained and saved there first if the
    file does not exist yet. Reading a cached file needs no write access to `root`.

    Several processes may ask at once: an exclusive lock on `<file>.lock` lets one train
    while the others wait, and the file is written under a temporary name and renamed, so
    no reader ever sees a partial file.
    """
    path = cache_path(dataset, root, settings)
    trained = False
    if not path.exists():
        trained = _train_and_save(dataset, root, settings, device, path)
    payload = torch.load(path, map_location=device, weights_only=True)
    net = SmallCNN(payload["image_shape"], payload["n_classes"], settings).to(device)
    net.load_state_dict(payload["state_dict"])
    return Classifier(net.eval(), float(payload["test_accuracy"]), path, trained, settings)


class Classifiers:
    """The classifiers one process uses, each loaded (or first trained) once, by dataset and
    device: what a study hands to `train(..., classifier=...)`."""

    def __init__(self, root, settings: Settings = DEFAULT_SETTINGS):
        self.root, self.settings = root, settings
        self.loaded: dict[tuple[str, str], Classifier] = {}

    def get(self, dataset: str, device: str = "cpu") -> Classifier:
        key = (dataset, str(device))
        if key not in self.loaded:
            self.loaded[key] = get_classifier(dataset, self.root, device, self.settings)
        return self.loaded[key]


def _train_and_save(dataset: str, root, settings: Settings, device: str, path: Path) -> bool:
    """Train the classifier and write it to `path`, unless another process did while we
    waited for the lock; True when this process trained it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        trained = not path.exists()
        if trained:
            start = time.perf_counter()
            net, test_accuracy = train_classifier(dataset, root, settings, device)
            payload = {
                "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
                "image_shape": list(net.image_shape),
                "n_classes": net.head[-1].out_features,
                "test_accuracy": test_accuracy,
                "settings": asdict(settings),
                "dataset": dataset,
                "dataset_digest": dataset_digest(dataset),
                "train_seconds": time.perf_counter() - start,
            }
            tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
            torch.save(payload, tmp)
            os.replace(tmp, path)
    return trained

