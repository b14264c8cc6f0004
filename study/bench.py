"""`make bench`: this project's training loop against a baseline written the way the PyTorch
VAE example works, measured in the same process, alternated, as ratios.

Reference configuration: 784-400-20 MLP, `bernoulli` on grey MNIST, batch 128, Adam 1e-3.
Writes reports/bench.json and prints a table. `--quick` runs a few iterations on a subset so
`make test` keeps it working; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from study.classifier import Classifiers
from study.config import Config
from study.data import Split, Splits, load_splits, splits_for
from study.denormals import flush_denormals
from study.evaluate import evaluate_elbo, evaluate_iwae
from study.model import build_model
from study.objective import elbo_terms
from study.specs import load_spec
from study.tracking import machine_name
from study.train import Trainer, resolve_device, train


def machine(device: str) -> dict:
    """CPU model and threads, or the GPU's name."""
    info = {"cpu": machine_name("cpu"), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(device: str, n: int = 2048, repeats: int = 10) -> float:
    """Dense fp32 matmul throughput, GFLOP/s (2 n^3 flops per product), best of `repeats`."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _best_ms(fn, device: str, steps: int, repeats: int) -> float:
    """Milliseconds per call of `fn`, the best of `repeats` timings of `steps` calls."""
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t) / steps)
    return best * 1e3


def model_gemm_gflops(model: torch.nn.Module, batch: int, device: str, steps: int = 50,
                      repeats: int = 5) -> float:
    """The matrix products of one training step of `model` alone (forward x W^T, backward
    g W and g^T x for every Linear layer) at batch size `batch`, GFLOP/s, best of `repeats`:
    the bound a step would reach if nothing but its matmuls took time."""
    shapes = [(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, torch.nn.Linear)]
    operands = [(torch.randn(batch, i, device=device), torch.randn(o, i, device=device),
                 torch.randn(batch, o, device=device)) for i, o in shapes]

    def step():
        for x, w, g in operands:
            x @ w.t()
            g @ w
            g.t() @ x

    step()
    seconds = _best_ms(step, device, steps, repeats) / 1e3
    return sum(3 * 2 * batch * i * o for i, o in shapes) / seconds / 1e9


def step_breakdown(trainer: Trainer, gemm_gflops: float, flops_per_image: float,
                   repeats: int = 3) -> dict:
    """Where the milliseconds of one eager training step at the reference batch go, measured
    by ablation of the training loop itself (timed alone, a forward/backward or an Adam step
    runs faster, with its data hot in cache, than between the others): whole epochs of
    `Trainer.run_epoch` on a copy of `trainer`, then the same with its Adam step made a
    no-op, and the epoch's gather alone. Each figure is the best of `repeats` epochs, so a
    noisy neighbour inflates none of them; `trainer` is untouched.

    step              one epoch / its steps (gather, forward, loss, backward, Adam, statistics)
    loop              step - gather: the per-batch work
    optimizer         step - the same without the Adam step
    gather            the epoch's shuffle, gather and uint8 -> float conversion, per step
    forward_backward  step - optimizer - gather (with the per-step statistics)
    gemm              the step's matmul flops at the model's matmul-only rate (model_gemm_gflops)
    non_gemm          forward_backward - gemm: elementwise kernels, autograd and dispatch
    gemm_share_of_step is gemm / step: the share of the step doing matmuls."""
    copy = Trainer(trainer.config.replace(compile=False), trainer.splits)
    copy.model.load_state_dict(trainer.model.state_dict())
    copy.likelihood.load_state_dict(trainer.likelihood.state_dict())
    device, steps, train_split = trainer.device, copy.steps_per_epoch, trainer.splits.train
    copy.run_epoch()  # warm: Adam's state exists from here on

    def epoch_ms() -> float:
        return _best_ms(copy.run_epoch, device, 1, repeats) / steps

    step = epoch_ms()
    copy.optimizer.step = lambda *args, **kwargs: None  # the ablation
    without = epoch_ms()
    generator = torch.Generator(device=device).manual_seed(0)
    buffer = torch.empty((len(train_split), *train_split.shape), device=device)
    gather = _best_ms(lambda: train_split.served(0, torch.randperm(
        len(train_split), device=device, generator=generator), out=buffer),
        device, 1, repeats) / steps
    forward_backward = without - gather
    gemm = flops_per_image * copy.config.batch_size / (gemm_gflops * 1e9) * 1e3
    return {"step_ms": step, "loop_ms": step - gather, "gemm_ms": gemm,
            "forward_backward_ms": forward_backward,
            "non_gemm_ms": forward_backward - gemm, "optimizer_ms": step - without,
            "gather_ms": gather, "gemm_share_of_step": gemm / step, "steps_timed": steps,
            "repeats": repeats,
            "achieved_gflops_best": flops_per_image * copy.config.batch_size / (step * 1e6),
            "parameters": sum(p.numel() for p in copy.model.parameters())}


class ExampleBaseline:
    """The PyTorch example's loop: torchvision MNIST + ToTensor, a shuffling DataLoader,
    sigmoid outputs and `binary_cross_entropy(..., reduction='sum')` + the summed KL, the
    loss summed over the batch. Same model class and hyperparameters as ours."""

    def __init__(self, config: Config, device: str, subset: int | None):
        import torchvision
        from torch.utils.data import DataLoader, Subset

        dataset = torchvision.datasets.MNIST(
            config.data_root, train=True, download=False,
            transform=torchvision.transforms.ToTensor(),
        )
        if subset is not None:
            dataset = Subset(dataset, range(subset))
        self.loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(config.seed))
        self.device = device
        torch.manual_seed(config.seed)
        self.model = build_model(config, (1, 28, 28)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)

    def run_epoch(self) -> None:
        self.model.train()
        for data, _ in self.loader:
            data = data.to(self.device)
            mu, logvar = self.model.encode(data)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            recon = torch.sigmoid(self.model.decode(z))
            bce = F.binary_cross_entropy(recon, data, reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = bce + kld
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()


def full_train_splits(config: Config, device: str, subset: int | None) -> Splits:
    """All official training images (as the example trains), the test split for evaluation."""
    base = load_splits("mnist", config.data_root, device=device, val_size=1, seed=config.seed)
    import torchvision

    ds = torchvision.datasets.MNIST(config.data_root, train=True, download=False)
    images, labels = ds.data.unsqueeze(1), ds.targets.long()
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    train_split = Split(images.to(device), labels.to(device), seed=config.seed)
    return Splits(train=train_split, val=base.test, test=base.test, dataset="mnist")


def training_flops_per_image(trainer: Trainer) -> float:
    """Matmul flops of one training step (forward + backward) per image, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = trainer.splits.train.served(0)[: trainer.config.batch_size]
    counter = FlopCounterMode(display=False)
    with counter:
        terms = elbo_terms(trainer.model, trainer.likelihood, x,
                           generator=torch.Generator(device=x.device).manual_seed(0))
        terms["loss"].backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def tracking_overhead(config: Config, splits: Splits) -> dict:
    """Percent of training time spent in the studies' MLflow logging (a real sqlite store)."""
    from study.tracking import Tracker, TrialLogger

    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db")
        run_id = tracker.start_run(tracker.experiment_id("bench"), "bench/tracking", tags={})
        logger = TrialLogger(tracker, run_id)
        result = train(config, [logger], splits=splits, evaluate_at_end=False)
        tracker.end_run(run_id, "FINISHED")
    train_seconds = sum(m["epoch_seconds"] for m in result.history)
    return {"tracking_seconds": logger.seconds, "train_seconds": train_seconds,
            "tracking_overhead_pct": 100 * logger.seconds / train_seconds}


def _scaling_worker(args) -> tuple[int, float, float]:
    """Run `trials` trials in this process; (trials, start of the first, end of the last) on
    the monotonic clock, which all processes of the machine share."""
    config, trials, threads = args
    torch.set_num_threads(threads)
    splits = splits_for(config)
    classifier = Classifiers(config.data_root).get(config.dataset)  # as a study's worker has
    warm_up = config.replace(seed=999, epochs=1)  # untimed: imports, allocations, caches
    train(warm_up, splits=splits, classifier=classifier)
    start = time.monotonic()
    for t in range(trials):
        train(config.replace(seed=t), splits=splits, classifier=classifier)
    return trials, start, time.monotonic()


def default_trial(data_root: str) -> Config:
    """The first trial of the default loss_choice study: what a trial of `make study` costs."""
    spec = load_spec("loss_choice", "default")
    return spec.config_for(spec.grid()[0], device="cpu", data_root=data_root)


def trials_per_hour(config: Config, jobs: int, trials: int) -> dict:
    """Trials per hour with `jobs` one-thread workers (jobs = 1: all cores), steady state: from
    the first timed trial's start in any worker to the last one's end, after each worker's
    start-up (interpreter, imports, data, one warm-up trial), which is reported apart
    (`startup_seconds`): a study pays it once per worker, not per trial."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs == 1 else 1
    ctx = mp.get_context("spawn")
    t = time.monotonic()
    with ctx.Pool(jobs) as pool:
        results = pool.map(_scaling_worker, [(config, trials // jobs, threads)] * jobs)
    done = sum(n for n, _, _ in results)
    first, last = min(s for _, s, _ in results), max(e for _, _, e in results)
    return {"trials_per_hour": done / (last - first) * 3600,
            "startup_seconds": first - t, "threads_per_worker": threads}


def alternated_epochs(loops, device: str, measured: int, peak_size: int,
                      peak_repeats: int) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds of each loop's epochs, alternated round by round after one warm-up epoch each
    (which also compiles), and the matmul peak measured beside every round: the host's speed
    drifts within minutes, so each epoch is set against the peak of its own round."""
    times = {name: [] for name, _ in loops}
    peaks = []
    for rep in range(1 + measured):
        if rep > 0:
            peaks.append(matmul_peak_gflops(device, n=peak_size, repeats=peak_repeats))
        for name, runner in loops:
            # the example does not flush denormals; `baseline_flushed` is the same loop with
            # them flushed on every thread, as our Trainer flushes them
            flush_denormals(name != "baseline")
            _sync(device)
            t = time.perf_counter()
            runner.run_epoch()
            _sync(device)
            if rep > 0:
                times[name].append(time.perf_counter() - t)
    flush_denormals()
    return times, peaks


def scaling(data_root: str, quick: bool) -> dict:
    """Trials per hour of a default loss_choice trial with JOBS = 1 and 2 (quick: one tiny
    epoch), with the trial described."""
    config = default_trial(data_root)
    if quick:
        config = config.replace(epochs=1, train_subset=1024, val_size=500, test_subset=200,
                                test_iw_k=5)
    runs = {f"jobs_{j}": trials_per_hour(config, j, 2 if quick else 4) for j in (1, 2)}
    images = config.train_subset or 60_000 - config.val_size
    return {
        "trials_per_hour": {k: v["trials_per_hour"] for k, v in runs.items()},
        "trials_per_hour_startup_seconds": {k: v["startup_seconds"] for k, v in runs.items()},
        "scaling_trial": f"a loss_choice trial of the {'quick' if quick else 'default'} "
                         f"budget, {config.epochs} epoch(s) over {images} images with its test "
                         f"metrics; steady state, after each worker's start-up and a warm-up "
                         f"trial",
    }


def loop_figures(times: dict[str, list[float]], peaks: list[float], flops_per_image: float,
                 n: int) -> dict:
    """Medians of the alternated epochs: seconds, images per second, the speed-ups against
    the example (as written, and with denormals flushed) and the fractions of the peak."""
    sec = {k: statistics.median(v) for k, v in times.items()}
    out = {"seconds_per_epoch": sec, "images_per_second": {k: n / v for k, v in sec.items()},
           "training_gflop_per_image": flops_per_image / 1e9,
           "matmul_peak_gflops": statistics.median(peaks), "matmul_peak_gflops_each_round": peaks}
    for ours, suffix in (("ours", ""), ("ours_compiled", "_compiled")):
        achieved = flops_per_image * n / sec[ours] / 1e9
        out[f"speedup{suffix}_vs_baseline"] = sec["baseline"] / sec[ours]
        out[f"speedup{suffix}_vs_baseline_flushed"] = sec["baseline_flushed"] / sec[ours]
        out[f"achieved_gflops{suffix}"] = achieved
        out[f"fraction_of_peak{suffix}"] = statistics.median(
            flops_per_image * n / t / 1e9 / p for t, p in zip(times[ours], peaks, strict=True))
        out[f"fraction_of_best_peak{suffix}"] = achieved / max(peaks)
    return out


def run(quick: bool, device: str, data_root: str, epochs: int) -> dict:
    device = resolve_device(device)
    subset = 2048 if quick else None
    config = Config(dataset="mnist", likelihood="bernoulli", hidden=(400,), latent_dim=20,
                    batch_size=128, lr=1e-3, device=device, data_root=data_root,
                    eval_batch_size=1000)
    splits = full_train_splits(config, device, subset)
    ours = Trainer(config, splits)
    ours_compiled = Trainer(config.replace(compile=True), splits)  # same seed, same noise
    base = ExampleBaseline(config, device, subset)
    loops = (("ours", ours), ("ours_compiled", ours_compiled), ("baseline", base),
             ("baseline_flushed", ExampleBaseline(config, device, subset)))
    n = len(splits.train)
    flops_per_image = training_flops_per_image(ours)
    peak_size, peak_repeats = (512, 3) if quick else (2048, 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one worker of JOBS=N (one thread each) can reach
    peak_one_thread = matmul_peak_gflops(device, n=peak_size, repeats=peak_repeats)
    torch.set_num_threads(threads)

    measured = 1 if quick else epochs
    times, peaks = alternated_epochs(loops, device, measured, peak_size, peak_repeats)
    speed = loop_figures(times, peaks, flops_per_image, n)
    test = {name: evaluate_elbo(trainer.model, ours.likelihood, splits.test, config,
                                seed=1)["nelbo"]
            for name, trainer in (("ours", ours), ("ours_compiled", ours_compiled),
                                  ("baseline", base))}
    gemm_bound = model_gemm_gflops(ours.model, config.batch_size, device,  # beside its use
                                   steps=5 if quick else 50, repeats=2 if quick else 5)
    breakdown = step_breakdown(ours, gemm_bound, flops_per_image, repeats=2 if quick else 3)
    iw_images, iw_k = (20, 50) if quick else (500, 1000)
    t = time.perf_counter()
    evaluate_iwae(ours.model, ours.likelihood, splits.test, k=iw_k, images=iw_images)
    iw_rate = iw_images / (time.perf_counter() - t)
    overhead = tracking_overhead(config.replace(epochs=1, train_subset=None), splits)

    return {
        "quick": quick,
        "machine": machine(device),
        "config": "784-400-20 MLP, bernoulli, grey MNIST, batch 128, Adam 1e-3",
        "train_images": n,
        "batch_size": config.batch_size,
        "epochs_measured": measured,
        **speed,
        "matmul_peak_gflops_one_thread": peak_one_thread,
        "model_gemm_gflops": gemm_bound,
        "model_gemm_fraction_of_peak": gemm_bound / speed["matmul_peak_gflops"],
        "step_breakdown": breakdown,
        "test_nelbo": {**test, "epochs_each": 1 + measured},
        "test_nelbo_gap": max(abs(test["ours"] - test["baseline"]),
                              abs(test["ours_compiled"] - test["baseline"])),
        "tracking": overhead,
        "iwae_eval": {"k": iw_k, "images": iw_images, "images_per_second": iw_rate},
        **scaling(data_root, quick),
    }


def table(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), "
        f"device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}, torch {m['torch']}",
        f"config: {r['config']}; {r['train_images']} training images; median of "
        f"{r['epochs_measured']} alternated epochs after a warm-up",
        f"{'':24s}{'ours':>12s}{'ours+compile':>14s}{'baseline':>12s}"
        f"{'baseline+FTZ':>14s}",
        *(f"{label:24s}{r[key]['ours']:12{fmt}}{r[key]['ours_compiled']:14{fmt}}"
          f"{r[key]['baseline']:12{fmt}}"
          + (f"{r[key]['baseline_flushed']:14{fmt}}" if "baseline_flushed" in r[key] else "")
          for label, key, fmt in (("seconds / epoch", "seconds_per_epoch", ".2f"),
                                  ("images / second", "images_per_second", ".0f"),
                                  ("test nelbo (nats/img)", "test_nelbo", ".2f"))),
        f"speed-up: {r['speedup_vs_baseline']:.2f}x eager, "
        f"{r['speedup_compiled_vs_baseline']:.2f}x with torch.compile; "
        f"test nelbo gap {r['test_nelbo_gap']:.2f} nats",
        f"against the baseline with denormals flushed (FTZ) on every thread: "
        f"{r['speedup_vs_baseline_flushed']:.2f}x eager, "
        f"{r['speedup_compiled_vs_baseline_flushed']:.2f}x with torch.compile",
        f"achieved {r['achieved_gflops']:.1f} GFLOP/s eager "
        f"({100 * r['fraction_of_peak']:.0f}%), {r['achieved_gflops_compiled']:.1f} GFLOP/s "
        f"compiled ({100 * r['fraction_of_peak_compiled']:.0f}%) of the fp32 matmul peak "
        f"measured beside each epoch (median {r['matmul_peak_gflops']:.1f} GFLOP/s); "
        f"{100 * r['fraction_of_best_peak']:.0f}% and "
        f"{100 * r['fraction_of_best_peak_compiled']:.0f}% of the best peak of the run "
        f"({max(r['matmul_peak_gflops_each_round']):.1f})",
        f"the model's matmuls alone at batch {r['batch_size']}: {r['model_gemm_gflops']:.1f} "
        f"GFLOP/s ({100 * r['model_gemm_fraction_of_peak']:.0f}% of peak); the rest of a step "
        f"(optimizer, elementwise, dispatch) takes "
        f"{100 * (1 - r['achieved_gflops'] / r['model_gemm_gflops']):.0f}% of the eager step",
        "one eager step (best of {repeats} passes over {steps_timed} steps), ms: {step_ms:.2f} = "
        "forward+backward "
        "{forward_backward_ms:.2f} (matmuls {gemm_ms:.2f}, elementwise and autograd "
        "{non_gemm_ms:.2f}) + fused Adam {optimizer_ms:.2f} over {parameters:,} parameters + "
        "the epoch's shuffle and gather {gather_ms:.2f}; matmuls are {pct:.0f}% of the step "
        "({achieved_gflops_best:.1f} GFLOP/s)".format(
            **r["step_breakdown"], pct=100 * r["step_breakdown"]["gemm_share_of_step"]),
        f"MLflow tracking overhead: {r['tracking']['tracking_overhead_pct']:.2f}% of training time",
        f"IWAE evaluation, k = {r['iwae_eval']['k']}: "
        f"{r['iwae_eval']['images_per_second']:.1f} images/s",
        f"trials per hour ({r['scaling_trial']}): JOBS=1 {r['trials_per_hour']['jobs_1']:.0f}, "
        f"JOBS=2 {r['trials_per_hour']['jobs_2']:.0f}; matmul peak on one thread "
        f"{r['matmul_peak_gflops_one_thread']:.1f} GFLOP/s against "
        f"{r['matmul_peak_gflops']:.1f} on {m['torch_threads']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="reports/bench.json", help="where to write the JSON")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs of each loop")
    parser.add_argument("--quick", action="store_true", help="a few iterations (tests)")
    args = parser.parse_args(argv)
    result = run(args.quick, args.device, args.data_root, args.epochs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
