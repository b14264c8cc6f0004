"""Reference check: the PyTorch VAE example's configuration trained with this engine.

784-400-20 MLP with ReLU, `bernoulli` on grey MNIST, batch 128, Adam at 1e-3, 10 epochs.
Prints the test nelbo (nats per image: summed over pixels and latent dims, averaged over the
10,000 test images, one posterior sample each, as the example computes its "Test set loss")
after every epoch, beside the example's own printed value where one is recorded.

The test split is evaluated every epoch here for REPORTING only, as the example does; no
choice is made from it. Unlike the example, training uses 55,000 images (5,000 are kept for
validation). Run: `python -m study.reference_check`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from study.config import Config
from study.evaluate import evaluate_elbo
from study.train import Callback, train

# "====> Test set loss" printed by pytorch/examples' vae/main.py in the log of PR #1416.
EXAMPLE_TEST_LOSS = {7: 106.6624}


class TestEveryEpoch(Callback):
    """Evaluates the test nelbo after each epoch and prints it beside the example's."""

    def __init__(self, config: Config):
        self.config, self.rows = config, []

    def on_train_start(self, model, likelihood, splits):
        self.model, self.likelihood, self.test = model, likelihood, splits.test

    def on_epoch(self, epoch, metrics):
        test = evaluate_elbo(self.model, self.likelihood, self.test, self.config, seed=epoch)
        self.rows.append({"epoch": epoch, "test_nelbo": test["nelbo"],
                          "train_nelbo": metrics["train/nelbo"],
                          "epoch_seconds": metrics["epoch_seconds"]})
        ref = EXAMPLE_TEST_LOSS.get(epoch)
        print(f"epoch {epoch:2d}  test nelbo {test['nelbo']:8.3f}  "
              f"example {ref if ref is not None else '-':>8}  "
              f"train nelbo {metrics['train/nelbo']:8.3f}  {metrics['epoch_seconds']:.2f} s/epoch",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.reference_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    config = Config(dataset="mnist", likelihood="bernoulli", hidden=(400,), latent_dim=20,
                    activation="relu", batch_size=128, lr=1e-3, epochs=args.epochs,
                    device=args.device, seed=args.seed, data_root=args.data_root)
    callback = TestEveryEpoch(config)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    result = train(config, [callback], evaluate_at_end=False)
    print(f"total training seconds: {result.seconds:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(callback.rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
