"""Study specs: the shipped suite meets its design, every problem of a bad spec is reported
together, and a bad spec given to the command line is one line on stderr, exit status 2,
with nothing written to the Optuna or MLflow stores (the CLI's other refusals:
test_runner, test_stores)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import optuna
import pytest
from helpers import REPO, assert_refused

from study.config import LIKELIHOODS, Config, burda_epochs
from study.errors import UsageError
from study.specs import PROFILES, VARIANT, load_spec, spec_names, suite_names

SUITE = ["kl_dynamics", "loss_choice", "search_fashion", "search_mnist"]

GOOD = """
sampler = "grid"
objectives = { "val/nelbo" = "minimize" }
[fixed]
latent_dim = 4
epochs = 1
[space]
beta = [0.5, 1.0]
"""


def write(tmp_path, text: str, name: str = "spec.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("profile", PROFILES)
def test_every_shipped_spec_is_valid_in_every_profile(profile):
    for name in spec_names():
        spec = load_spec(name, profile)
        assert spec.profile == profile and spec.study_name == f"{name}-{profile}"
        assert spec.size() >= 1
    assert suite_names(profile) == SUITE


def dims(spec):
    return {d.name: d for d in spec.dimensions}


@pytest.mark.parametrize("profile", ["default", "full"])
def test_loss_choice_is_the_designed_grid(profile):
    spec = load_spec("loss_choice", profile)
    d = dims(spec)
    assert spec.sampler == "grid"
    assert set(d["dataset"].choices) == {"mnist", "fashion"}
    # as people write the loss (BCE, plain SSE) against the calibrated Gaussian; the learned
    # sigma beside it in the long reference
    assert {"bernoulli", "gaussian", "gaussian_optimal"} <= set(d["likelihood"].choices)
    if profile == "full":
        assert {"gaussian_learned", "continuous_bernoulli"} <= set(d["likelihood"].choices)
    betas = d["beta"].choices
    assert 1.0 in betas and len(betas) >= 2  # a verdict at each beta, and pooled
    assert len(d["seed"].choices) >= 3  # the paired tests' minimum at each beta
    assert "latent_dim" not in d and spec.base.latent_dim == 20
    assert spec.base.train_subset is None and spec.base.epochs >= 10  # the full split
    assert math.isclose(spec.base.sigma ** 2, 0.5)  # gaussian = plain SSE
    assert spec.size() == 2 * len(d["likelihood"].choices) * len(betas) * len(d["seed"].choices)


@pytest.mark.parametrize("profile", ["default", "full"])
def test_kl_dynamics_spans_latents_betas_and_variants(profile):
    spec = load_spec("kl_dynamics", profile)
    d = dims(spec)
    assert max(d["latent_dim"].choices) >= 64  # room for units to collapse
    assert {1.0, 4.0} <= set(d["beta"].choices)
    assert spec.base.train_subset is None and spec.base.epochs >= 10
    assert set(d["dataset"].choices) == {"mnist", "fashion"}
    configs = {v: spec.config_for({VARIANT: v, "beta": 1.0, "latent_dim": 2})
               for v in d[VARIANT].choices}
    assert any(c.beta_schedule == "linear" and c.warmup > 0 for c in configs.values())
    assert any(c.free_bits > 0 for c in configs.values())
    assert any(c.beta_schedule == "constant" and c.free_bits == 0 for c in configs.values())


@pytest.mark.parametrize("name,dataset", [("search_mnist", "mnist"), ("search_fashion", "fashion")])
def test_search_specs_are_multi_objective_rate_distortion(name, dataset):
    spec = load_spec(name, "default")
    assert spec.base.dataset == dataset
    assert dict(spec.objectives) == {"val/kl": "minimize", "val/sse": "minimize"}
    assert spec.sampler in ("nsga2", "tpe") and spec.pruner == "none"
    d = dims(spec)
    assert set(d) == {"likelihood", "beta", "latent_dim"}
    assert d["beta"].log and d["latent_dim"].integer


def test_burda2016_follows_the_paper():
    full, default, smoke = (load_spec("burda2016", p) for p in ("full", "default", "smoke"))
    c = full.base
    assert (c.dataset, c.binarize, c.val_size, c.hidden, c.activation, c.latent_dim) == \
        ("mnist", "dynamic", 400, (200, 200), "tanh", 50)
    assert (c.likelihood, c.batch_size, c.adam_eps, c.lr, c.lr_schedule) == \
        ("bernoulli", 20, 1e-4, 1e-3, "burda")
    assert c.epochs == burda_epochs(8) == 3280 and c.test_iw_k == 5000
    assert default.base.epochs == burda_epochs(3) == 13
    assert smoke.base.epochs == 1
    # the two one-stochastic-layer rows of Table 1 (VAE k = 1, IWAE k = 50) with the Adam
    # (betas included) and initialization of the authors' code, and the VAE with torch's
    assert not full.suite and [d.name for d in full.dimensions] == ["seed", "variant"]
    assert c.adam_betas == (0.99, 0.999)
    assert (c.optimizer, c.init) == ("adam_burda", "glorot")
    assert full.size() == 9  # 3 seeds x 3 rows
    rows = {v: full.config_for({"seed": 0, "variant": v}) for v in ("vae", "iwae_k50",
                                                                     "vae_torch")}
    assert [rows[v].iw_samples for v in rows] == [1, 50, 1]
    assert (rows["vae_torch"].optimizer, rows["vae_torch"].init) == ("adam", "torch")
    assert rows["vae_torch"].replace(optimizer="adam_burda", init="glorot") == rows["vae"]


def test_smoke_profile_is_tiny():
    for name in SUITE:
        spec = load_spec(name, "smoke")
        assert spec.base.epochs == 1 and spec.base.train_subset <= 5000
        assert spec.size() <= 8


# --------------------------------------------------------------------------- the format


def test_profiles_merge_entry_by_entry_and_ranges_suggest_within_bounds(tmp_path):
    path = write(tmp_path, """
        sampler = "random"
        trials = 5
        objectives = { "val/sse" = "minimize" }
        seeds = [0, 1]
        [fixed]
        epochs = 7
        train_subset = 100
        hidden = [64, 32]
        [space]
        beta = { low = 0.01, high = 10.0, log = true }
        latent_dim = { low = 2, high = 64 }
        [profiles.smoke]
        trials = 2
        fixed = { epochs = 1, test_subset = "all" }
        space = { latent_dim = [2, 3] }
    """)
    spec = load_spec(path, "smoke")
    assert spec.trials == 2
    assert (spec.base.epochs, spec.base.train_subset, spec.base.test_subset) == (1, 100, None)
    assert spec.base.hidden == (64, 32)
    d = dims(spec)
    assert d["latent_dim"].choices == (2, 3) and d["beta"].log and d["seed"].choices == (0, 1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = spec.suggest(trial)
        config = spec.config_for(params, device="cpu")
        assert 0.01 <= config.beta <= 10 and config.latent_dim in (2, 3)
        assert config.validate() == []
    assert load_spec(path, "default").trials == 5


def test_extends_overrides_the_base(tmp_path):
    write(tmp_path, "suite = true\n" + GOOD + "[profiles.smoke]\nfixed = { epochs = 2 }\n",
          "base.toml")
    child = write(tmp_path, """
        extends = "base.toml"
        [fixed]
        dataset = "fashion"
    """, "child.toml")
    spec = load_spec(child, "smoke")
    assert spec.base.dataset == "fashion" and spec.base.latent_dim == 4 and spec.base.epochs == 2
    assert not spec.suite  # a derived spec joins the suite only when it says so
    assert len(spec.grid()) == 2


def test_dimensions_keep_the_files_order_in_every_process():
    """loss_choice writes seeds, datasets, then [space] likelihood, beta: every process,
    whatever its hash seed, must see that order (a study's recorded settings list it)."""
    script = ("from study.specs import load_spec; "
              "print(' '.join(d.name for d in load_spec('loss_choice', 'default').dimensions))")
    orders = {subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                             text=True, check=True, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
              for seed in range(6)}
    assert orders == {"seed dataset likelihood beta"}


def test_tuple_valued_dimension_round_trips(tmp_path):
    path = write(tmp_path, GOOD + "hidden = [[32], [16, 16]]\n")
    spec = load_spec(path)
    points = spec.grid()
    assert len(points) == 4
    assert {spec.config_for(p).hidden for p in points} == {(32,), (16, 16)}


def test_every_problem_is_reported_together(tmp_path):
    path = write(tmp_path, """
        sampler = "random"
        colour = "blue"
        objectives = { "val/nelbo" = "minimise" }
        [fixed]
        latent_dim = "twenty"
        bogus_field = 3
        [space]
        likelihood = ["bernoulli", "poisson"]
        beta = { low = 10.0, high = 0.1, log = true }
        lr = []
        [profiles.smoke]
        fixed = { epochs = 0 }
    """)
    with pytest.raises(UsageError) as err:
        load_spec(path, "default")
    message = str(err.value)
    assert "\n" not in message
    for needle in ("'colour'", "minimise", "latent_dim must be an integer", "'bogus_field'",
                   "'poisson'", "low 10.0 must be below high 0.1", "space.lr is an empty list",
                   "trials must be an integer", "[profile smoke]", "epochs must be >= 1"):
        assert needle in message, needle
    assert message.count(";") >= 8


@pytest.mark.parametrize("body,needle", [
    ("[fixed]\nbeta = 0.0\n", "beta must be > 0"),
    ("[space]\nbeta = [1.0, -2.0]\n", "space.beta: beta must be > 0, got -2.0"),
    ("[space]\nlatent_dim = [0, 4]\n", "latent_dim must be >= 1, got 0"),
    ("[space]\nlatent_dim = { low = 0, high = 8 }\n", "latent_dim must be >= 1, got 0"),
    ("[space]\nbeta = { low = -1.0, high = 1.0, log = true }\n", "log-uniform"),
    ("[space]\nbeta = { low = 1, high = 2, sharp = true }\n", "unknown key 'sharp'"),
    ("[space]\nlikelihood = [\"poisson\"]\n", "likelihood = 'poisson' is not one of"),
    ("[space]\nbeta = []\n", "empty list"),
    ('sampler = "random"\ntrials = 3\n[space]\n', "search space is empty"),
    ('sampler = "annealing"\n', "sampler = 'annealing' is not one of"),
    ('pruner = { type = "median", patience = 3 }\n', "pruner has unknown option(s) patience"),
    ('objectives = { "val/kl" = "minimize", "val/sse" = "minimize" }\npruner = "median"\n',
     "a pruner needs a single objective"),
    ('objectives = { "test/iwae_nll" = "minimize" }\n', "unknown key 'test/iwae_nll' in [objectives]"),
    ("[fixed]\ndevice = \"cuda\"\n", "set by the runner"),
    ("[fixed]\nhidden = 400\n", "fixed.hidden must be a list, got 400 (int)"),
    ("[fixed]\nhidden = []\n", "fixed.hidden is an empty list"),
    ('seeds = [0, -1]\n[space]\n', "seeds[1] must be >= 0, got -1"),
    ("[profiles.huge]\n", "unknown key 'huge' in [profiles]"),
    ("trials = 4\n", "trials is not used by a grid"),
    # what the schema guarantees: strict types, closed tables, errors located by their path
    ("[fixed]\nlatent_dim = true\n", "fixed.latent_dim must be an integer, got True (bool)"),
    ('[fixed]\nbeta = "3"\n', "fixed.beta must be a number, got '3' (str)"),
    ("[fixed]\ncompile = 1\n", "fixed.compile must be true or false, got 1 (int)"),
    ('[fixed]\ntrain_subset = "some"\n', 'fixed.train_subset must be an integer or "all"'),
    ("[fixed]\nadam_betas = [0.9, 0.99, 0.999]\n", "fixed.adam_betas must have at most 2 items"),
    ('[space]\nbeta = [1.0, "x"]\n', "space.beta[1] must be a number, got 'x' (str)"),
    ("[space]\nbeta = 0.5\n", "space.beta must be a list of values or a range table"),
    ("[space]\nbeta = { low = 1, high = 2, sharp = true }\n", "unknown key 'sharp' in [space.beta]"),
    ("[space]\nbeta = { low = 1.0 }\n", "space.beta.high is missing"),
    ("[space]\nbeta = { low = 1.0, high = inf }\n", "space.beta.high must be a finite number"),
    ("[space]\nlatent_dim = { low = 2.5, high = 8 }\n", "space.latent_dim.low must be an integer"),
    ("[space]\nbeta = { low = 1.0, high = 2.0, step = 0.1, log = true }\n",
     "space.beta cannot have both log = true and a step"),
    ("[space]\nlikelihood = { low = 1, high = 2 }\n", "space.likelihood takes a list of values"),
    ('[variants]\na = { device = "cpu" }\n', "variants.a.device is set by the runner"),
    ('sampler = { type = "grid", x = 1 }\n', "sampler takes no options for grid, got x"),
    ('sampler = { population_size = 3 }\n', "sampler.type is missing"),
    ('[profiles.smoke]\ndescription = "x"\n', "unknown key 'description' in [profiles.smoke]"),
    ('[profiles.full]\nsampler = { type = "tpe", bogus = 1 }\n',
     "profiles.full.sampler has unknown option(s) bogus for tpe"),
])
def test_single_problems_are_named(tmp_path, body, needle):
    base = "sampler = \"grid\"\n" if "sampler" not in body else ""
    path = write(tmp_path, base + body)
    with pytest.raises(UsageError) as err:
        load_spec(path)
    assert needle in str(err.value)


def test_each_problem_is_reported_once_where_it_is_written(tmp_path):
    path = write(tmp_path, """
        sampler = "grid"
        [fixed]
        latent_dim = true
        [space]
        beta = { low = 1.0, high = 2.0, sharp = true }
        [profiles.smoke]
        fixed = { epochs = "1" }
        [profiles.full]
        fixed = { epochs = 0 }
    """)
    with pytest.raises(UsageError) as err:
        load_spec(path, "smoke")
    message = str(err.value)
    for needle in ("has 4 problems", "fixed.latent_dim must be an integer, got True (bool)",
                   "unknown key 'sharp' in [space.beta]",
                   "profiles.smoke.fixed.epochs must be an integer, got '1' (str)",
                   "[profile full] fixed: epochs must be >= 1, got 0"):
        assert needle in message, needle


def test_malformed_toml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, 'sampler = "grid"\n[fixed\nbeta = 1\n')
    with pytest.raises(UsageError, match=r"not valid TOML .*line 2"):
        load_spec(path)


def test_unknown_names_are_usage_errors():
    with pytest.raises(UsageError, match="unknown study 'nope'; choose one of .*loss_choice"):
        load_spec("nope")
    with pytest.raises(UsageError, match="unknown profile 'huge'"):
        load_spec("loss_choice", "huge")


# --------------------------------------------------------------------------- the CLI


BAD_SPECS = {
    "malformed": ('[fixed\nbeta = 1\n', "not valid TOML"),
    "unknown key": (GOOD + "colour = 1\n", "unknown key 'colour'"),
    "unknown likelihood": (GOOD + "likelihood = [\"poisson\"]\n", "'poisson' is not one of"),
    "beta <= 0": (GOOD.replace("[0.5, 1.0]", "[0.0, 1.0]"), "beta must be > 0"),
    "latent_dim < 1": (GOOD.replace("latent_dim = 4", "latent_dim = 0"), "latent_dim must be >= 1"),
    "empty space": (GOOD.replace("[0.5, 1.0]", "[]"), "empty list"),
}


@pytest.mark.parametrize("case", BAD_SPECS)
def test_bad_spec_exits_2_and_writes_nothing(tmp_path, capsys, fresh_stores, case):
    text, needle = BAD_SPECS[case]
    path = write(tmp_path, text)
    line = assert_refused(capsys, ["run", "--study", str(path), *fresh_stores["args"]], needle,
                          fresh_stores["folder"])
    assert "fix" in line


def test_config_fields_cover_likelihoods():
    """The spec validator leans on Config.validate for choices: every likelihood passes."""
    for name in LIKELIHOODS:
        assert Config(likelihood=name).validate() == []
