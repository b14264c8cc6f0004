"""The one typed configuration of a training run: spec files and the CLI fill it, MLflow
logs it. Every field carries one line of why."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from study.paths import default_data_root

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned", "gaussian_optimal",
               "continuous_bernoulli", "laplace")
ARCHITECTURES = ("mlp", "conv")
ACTIVATIONS = ("relu", "tanh", "elu", "leaky_relu", "softplus")
BETA_SCHEDULES = ("constant", "linear", "cyclical")
SCHEDULE_UNITS = ("step", "epoch")
LR_SCHEDULES = ("constant", "burda")
INITS = ("torch", "glorot")
OPTIMIZERS = ("adam", "adam_burda")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class Config:
    # --- data
    dataset: str = "mnist"
    """Which dataset: `mnist` or `fashion`."""
    binarize: str = "none"
    """`none` trains on grey values; `static` on one fixed binary sample; `dynamic` resamples per epoch."""
    val_size: int = 5000
    """Images carved (seeded) from the official train split for validation and model selection."""
    train_subset: int | None = None
    """Train on the first N shuffled training images only (tests, smoke runs); None = all."""
    test_subset: int | None = None
    """Evaluate on the first N test images only (tests, smoke runs); None = all 10,000."""
    data_root: str = field(default_factory=default_data_root)
    """Folder holding MNIST/raw and FashionMNIST/raw: $VAE_DATA_ROOT, else the project's data/
    (study.paths), filled by `make data` or `python -m study.data`."""

    # --- model
    architecture: str = "mlp"
    """`mlp` (fully connected) or `conv` (small convolutional encoder/decoder)."""
    hidden: tuple[int, ...] = (400,)
    """Hidden layer widths of the MLP encoder (the decoder mirrors them); (400,) is the PyTorch example."""
    activation: str = "relu"
    """Hidden activation; Burda et al. 2016 use tanh."""
    latent_dim: int = 20
    """Dimension of z; the prior is N(0, I) over it."""
    init: str = "torch"
    """`torch` (nn.Linear's default) or `glorot`, yburda/iwae's (mlp, bernoulli: see glorot_init)."""

    # --- likelihood p(x|z)
    likelihood: str = "bernoulli"
    """Decoder p(x|z): bernoulli (BCE), gaussian (MSE), gaussian_learned, gaussian_optimal
    (sigma-VAE: sigma^2 = MSE in closed form), continuous_bernoulli, laplace."""
    sigma: float = math.sqrt(0.5)
    """Fixed Gaussian std; sigma^2 = 1/2 makes -log p exactly SSE + (D/2) log(pi)."""
    laplace_scale: float = 1.0
    """Fixed Laplace scale b; b = 1 makes -log p exactly L1 + D log 2."""
    init_log_sigma: float = 0.0
    """Starting value of the shared learned log-sigma of `gaussian_learned`."""

    # --- objective
    beta: float = 1.0
    """Weight of the KL term in the optimized loss (1 = the ELBO)."""
    beta_schedule: str = "constant"
    """`constant`, `linear` warm-up from 0, or `cyclical` (Fu et al. 2019)."""
    warmup: int = 0
    """Length of the linear warm-up (in `schedule_unit`); 0 = none."""
    cycles: int = 4
    """Number of cycles of the cyclical schedule over the whole run."""
    cycle_ratio: float = 0.5
    """Fraction of each cycle spent increasing beta (the rest holds it at `beta`)."""
    schedule_unit: str = "step"
    """Whether `warmup` and cycles count optimizer steps or epochs."""
    free_bits: float = 0.0
    """Per-dimension KL floor lambda in nats (Kingma et al. 2016), in the optimized loss only."""
    iw_samples: int = 1
    """Samples k of the training bound: 1 = VAE ELBO, k > 1 = IWAE (Burda et al. 2016, eq. 8)."""

    # --- optimization
    epochs: int = 10
    """Passes over the training split."""
    batch_size: int = 128
    """Images per optimizer step."""
    lr: float = 1e-3
    """Adam learning rate (the first stage's under the `burda` schedule)."""
    lr_schedule: str = "constant"
    """`constant`, or `burda`: 3^i epochs at lr * 10^(-i/7), i = 0, 1, ... (Burda et al. 2016)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    adam_eps: float = 1e-8
    """Adam's epsilon; Burda et al. 2016 use 1e-4."""
    optimizer: str = "adam"
    """`adam` (torch's) or `adam_burda`, yburda/iwae's Adam (see study.train.BurdaAdam)."""

    # --- evaluation
    eval_batch_size: int = 1000
    """Images per evaluation batch (memory bound, not a statistic)."""
    test_iw_k: int = 1000
    """Importance samples k of the test bound `test/iwae_nll` (Burda et al. 2016 use 5000)."""
    test_iw_images: int | None = None
    """Evaluate the k-sample bound on the first N test images only; None = all."""
    step_log_every: int = 10
    """In the first epoch, report train/recon and train/kl every this many steps."""

    # --- run
    seed: int = 0
    """Seeds the validation carve, initialization, shuffling, noise and binarization."""
    device: str = "auto"
    """`auto` picks cuda, then mps, then cpu."""
    threads: int | None = None
    """torch intra-op threads; None leaves torch's default (set to 1 per worker with JOBS > 1)."""
    compile: bool = False
    """Compile the whole training step (gradient and Adam) with torch.compile; falls back to
    eager cleanly."""
    checkpoint_minutes: float = 10.0
    """Save a resumable state at the first epoch end after this many minutes (0 = every epoch)."""

    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    """Free-form tags (study name, trial number) carried along; never read by training."""

    def validate(self) -> list[str]:
        """Every problem with this config, each as one sentence; empty when valid."""
        problems = []

        def choice(name, options):
            value = getattr(self, name)
            if value not in options:
                problems.append(f"{name} = {value!r} is not one of {', '.join(options)}")

        choice("likelihood", LIKELIHOODS)
        choice("architecture", ARCHITECTURES)
        choice("activation", ACTIVATIONS)
        choice("beta_schedule", BETA_SCHEDULES)
        choice("schedule_unit", SCHEDULE_UNITS)
        choice("lr_schedule", LR_SCHEDULES)
        choice("init", INITS)
        choice("optimizer", OPTIMIZERS)
        if self.init == "glorot" and (self.architecture, self.likelihood) != ("mlp", "bernoulli"):
            problems.append("init = 'glorot' needs architecture = 'mlp' and likelihood = "
                            "'bernoulli' (its output bias is the logit of the mean image)")
        choice("device", DEVICES)
        choice("binarize", ("none", "static", "dynamic"))
        choice("dataset", ("mnist", "fashion"))
        positive = ["latent_dim", "epochs", "batch_size", "val_size", "eval_batch_size",
                    "test_iw_k", "iw_samples", "cycles", "step_log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("beta", "sigma", "laplace_scale", "lr", "adam_eps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                problems.append(f"{name} must be > 0, got {value}")
        if not self.checkpoint_minutes >= 0:
            problems.append(f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        if self.warmup < 0 or self.free_bits < 0:
            problems.append("warmup and free_bits must be >= 0")
        if not 0 < self.cycle_ratio <= 1:
            problems.append(f"cycle_ratio must be in (0, 1], got {self.cycle_ratio}")
        if any(h < 1 for h in self.hidden):
            problems.append(f"hidden widths must be >= 1, got {self.hidden}")
        return problems

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def as_params(self) -> dict[str, str]:
        """Flat string params for MLflow (config fields plus implied quantities)."""
        params = {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name != "extra"}
        params.update({k: str(v) for k, v in self.implied().items()})
        return params

    def implied(self) -> dict[str, float]:
        """Quantities a reader compares across likelihoods.

        For a fixed-sigma Gaussian the loss SSE/(2 sigma^2) + beta KL equals (up to a constant
        and a positive factor) SSE + 2 sigma^2 beta KL, so `sse_equivalent_beta` = 2 sigma^2 beta
        is the beta of plain summed SSE that gives the same optimum.
        """
        out = {}
        if self.likelihood == "gaussian":
            out["implied_sigma"] = self.sigma
            out["sse_equivalent_beta"] = 2 * self.sigma**2 * self.beta
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def field_types(cls) -> dict[str, str]:
        return {f.name: str(f.type) for f in dataclasses.fields(cls) if f.name != "extra"}


def burda_epochs(stages: int) -> int:
    """Total passes of the first `stages` stages of Burda et al.'s schedule: sum of 3^i."""
    return sum(3**i for i in range(stages))
