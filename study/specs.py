"""Study specs: one TOML file per study under `study/specs/`, merged with a profile (`smoke`,
`default`, `full`) and validated into `Config` fields before anything runs.

`load_spec(name_or_path, profile) -> Spec`. Every problem of a spec (unknown keys, wrong
types, empty spaces, impossible ranges, invalid Config values) is reported together in one
`UsageError`. A spec reads like this (keys in brackets are optional):

    description = "Which likelihood, at which beta?"
    suite = true                        # part of `python -m study.runner run`
    sampler = "grid"                    # grid | random | tpe | nsga2 (or a table, below)
    pruner = "none"                     # none | median | hyperband (single objective only)
    objectives = { "val/nelbo" = "minimize" }   # one or more metric = direction
    [trials = 20]                       # finished trials wanted (search samplers only:
                                        # a grid runs each point once)
    [datasets = ["mnist", "fashion"]]   # sugar: a `dataset` grid/search dimension (fixed when one)
    [seeds = [0, 1, 2]]                 # sugar: a `seed` dimension, so confidence intervals are possible

    [fixed]                             # Config fields held fixed
    latent_dim = 20
    [space]                             # searched Config fields: a list, or a range table
    likelihood = ["bernoulli", "gaussian"]
    beta = { low = 0.1, high = 10.0, log = true }
    latent_dim = { low = 2, high = 64, log = true }   # integer fields give integer ranges
    [variants]                          # named bundles of Config fields: one `variant` dimension
    plain = {}
    warmup = { beta_schedule = "linear", warmup = 2, schedule_unit = "epoch" }
    [profiles.smoke]                    # overrides: any key above but description/suite/extends;
    seeds = [0]                         # fixed / space / variants merge entry by entry
    fixed = { epochs = 1, train_subset = 2000 }

A sampler or pruner with options is a table: `sampler = { type = "nsga2", population_size = 8 }`,
`pruner = { type = "median", n_startup_trials = 1 }`.
`extends = "other_spec"` starts from another spec's table (entries override it). Optional
integer fields (`train_subset`, `test_subset`, `test_iw_images`) take the string "all" for None.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.config import Config
from study.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPEC_DIR = Path(__file__).with_name("specs")
PROFILES = ("smoke", "default", "full")
SAMPLERS = ("grid", "random", "tpe", "nsga2")
PRUNERS = ("none", "median", "hyperband")
DIRECTIONS = ("minimize", "maximize")
OBJECTIVE_METRICS = tuple(
    [f"val/{k}" for k in ("nelbo", "recon", "kl", "sse", "mse", "active_units")]
    + [f"train/{k}" for k in ("loss", "nelbo", "recon", "kl")]
)
TOP_KEYS = ("description", "suite", "extends", "sampler", "pruner", "objectives", "trials",
            "datasets", "seeds", "fixed", "space", "variants", "profiles")
PROFILE_KEYS = tuple(k for k in TOP_KEYS if k not in ("description", "suite", "extends", "profiles"))
MERGED_TABLES = ("fixed", "space", "variants")  # merged entry by entry; other keys replace
RUNNER_FIELDS = ("device", "threads", "data_root", "extra")  # set by the runner, not by specs
VARIANT = "variant"
ALL = "all"  # spelling of None for the optional integer fields (TOML has no null)


# --------------------------------------------------------------------------- dimensions


@dataclass(frozen=True)
class Dimension:
    """One searched Config field (or `variant`): a list of choices, or a numeric range."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def is_grid(self) -> bool:
        return self.choices is not None

    def optuna_choices(self) -> list:
        """Choices as Optuna stores them: scalars as is, tuples (e.g. `hidden`) as JSON text."""
        return [json.dumps(list(c)) if isinstance(c, tuple) else c for c in self.choices]

    def suggest(self, trial) -> Any:
        if self.is_grid:
            return trial.suggest_categorical(self.name, self.optuna_choices())
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def decode(self, value: Any) -> Any:
        """The Config value of an Optuna param value."""
        if isinstance(value, str) and value.startswith("["):
            return tuple(json.loads(value))
        return value

    def distribution(self):
        """The Optuna distribution `suggest` draws from (to add a trial made elsewhere)."""
        import optuna

        if self.is_grid:
            return optuna.distributions.CategoricalDistribution(self.optuna_choices())
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high),
                                                        log=self.log, step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log,
                                                      step=self.step)

    def from_param(self, text: str) -> Any:
        """The Optuna param value of a run whose MLflow param (a string) is `text`, or None
        when it is none of this dimension's values."""
        if self.is_grid:
            for choice in self.optuna_choices():
                if str(self.decode(choice)) == text:
                    return choice
            return None
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            return None
        return value if self.distribution()._contains(
            self.distribution().to_internal_repr(value)) else None

    def describe(self) -> str:
        if self.is_grid:
            return f"{self.name} in {list(self.choices)}"
        kind = "int" if self.integer else "float"
        return f"{self.name} ~ {kind}[{self.low}, {self.high}]{' log' if self.log else ''}"


@dataclass(frozen=True)
class Spec:
    """A validated study spec for one profile: everything the runner needs, nothing else."""

    name: str
    profile: str
    path: Path
    description: str
    suite: bool
    base: Config
    dimensions: tuple[Dimension, ...]
    variants: dict[str, dict] = field(default_factory=dict)
    sampler: str = "grid"
    sampler_options: dict = field(default_factory=dict)
    pruner: str = "none"
    pruner_options: dict = field(default_factory=dict)
    objectives: tuple[tuple[str, str], ...] = (("val/nelbo", "minimize"),)
    trials: int = 1
    table: dict = field(default_factory=dict, repr=False)
    """The merged TOML table of this profile (logged on the parent run)."""

    @property
    def study_name(self) -> str:
        """The Optuna study: one per spec and profile, so profiles never share trials. The
        MLflow experiment is the spec's `name` (its runs carry a `profile` tag)."""
        return study_name(self.name, self.profile)

    @property
    def metrics(self) -> list[str]:
        return [m for m, _ in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.objectives]

    def grid(self) -> list[dict]:
        """Every point of a grid spec as Optuna params, first dimension slowest."""
        names = [d.name for d in self.dimensions]
        values = [d.optuna_choices() for d in self.dimensions]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]

    def suggest(self, trial) -> dict:
        return {d.name: d.suggest(trial) for d in self.dimensions}

    def config_for(self, params: dict, **runner_fields) -> Config:
        """The Config of one trial: fixed fields, then the variant's bundle, then the params."""
        changes = dict(self.variants.get(params.get(VARIANT), {}))
        for dim in self.dimensions:
            if dim.name != VARIANT and dim.name in params:
                changes[dim.name] = dim.decode(params[dim.name])
        return self.base.replace(**changes, **runner_fields)

    def size(self) -> int:
        """Trials to finish: one per grid point, or the trial budget of a search."""
        return len(self.grid()) if self.sampler == "grid" else self.trials


def study_name(spec_name: str, profile: str) -> str:
    return f"{spec_name}-{profile}"


# --------------------------------------------------------------------------- loading


def spec_names() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.toml"))


def suite_names(profile: str = "default") -> list[str]:
    """The default suite: every spec with `suite = true`, in file-name order."""
    return [name for name in spec_names() if load_spec(name, profile).suite]


def spec_path(name_or_path: str | Path) -> Path:
    """A spec name (`loss_choice`) or a path to a .toml file -> the file, or UsageError."""
    text = str(name_or_path)
    candidate = Path(text)
    if text.endswith(".toml") or candidate.parent != Path("."):
        if not candidate.is_file():
            raise UsageError(f"spec file {candidate} does not exist; pass a study name "
                             f"({', '.join(spec_names())}) or an existing .toml path")
        return candidate.resolve()
    path = SPEC_DIR / f"{text}.toml"
    if not path.is_file():
        raise UsageError(f"unknown study {text!r}; choose one of {', '.join(spec_names())} "
                         f"(files in {SPEC_DIR}) or pass a path to a .toml spec")
    return path


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"spec {path} is not valid TOML ({exc}); fix the syntax and run again") \
            from None
    except OSError as exc:
        raise UsageError(f"cannot read spec {path} ({exc.strerror}); check the path") from None


def _merge(base: dict, override: dict) -> dict:
    """`override` over `base`: fixed / space / variants entry by entry, profiles per profile."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key in MERGED_TABLES and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        elif key == "profiles" and isinstance(value, dict) and isinstance(out.get(key), dict):
            merged = dict(out[key])
            for name, table in value.items():
                if isinstance(table, dict) and isinstance(merged.get(name), dict):
                    merged[name] = _merge(merged[name], table)
                else:
                    merged[name] = copy.deepcopy(table)
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_extends(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    table = _read_toml(path)
    parent = table.pop("extends", None)
    if parent is None:
        return table
    if not isinstance(parent, str):
        raise UsageError(f"spec {path}: extends must be a spec name (a string), "
                         f"got {parent!r}")
    parent_path = spec_path(parent) if not parent.endswith(".toml") \
        else (path.parent / parent).resolve()
    if parent_path in seen or parent_path == path:
        raise UsageError(f"spec {path}: extends forms a cycle through {parent_path.name}; "
                         f"remove one of the extends lines")
    base = _resolve_extends(parent_path, (*seen, path))
    base.pop("suite", None)  # a derived spec joins the suite only when it says so
    return _merge(base, table)


def load_spec(name_or_path: str | Path, profile: str = "default") -> Spec:
    """Read, merge with `profile` and validate a spec; raise UsageError listing every problem.

    All three profiles are checked, so a broken `full` profile is caught by a smoke run.
    """
    if profile not in PROFILES:
        raise UsageError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)} "
                         f"(--profile / PROFILE=)")
    path = spec_path(name_or_path)
    table = _resolve_extends(path)
    problems: list[str] = []
    spec = None
    seen: set[str] = set()
    for name in (profile, *[p for p in PROFILES if p != profile]):
        built, found = _build(table, path.stem, name, path)
        prefix = "" if name == profile else f"[profile {name}] "
        problems += [prefix + p for p in found if p not in seen]
        seen.update(found)
        if name == profile:
            spec = built
    if problems:
        raise UsageError(
            f"spec {path.stem!r} ({path}) has {len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}: " + "; ".join(problems)
            + " -- fix the spec and run again"
        )
    return spec


# --------------------------------------------------------------------------- validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _coerce(name: str, type_name: str, value):
    """A TOML value as the Config field `name` of type `type_name`; (value, problem)."""
    bad = f"{name} must be {{}}, got {value!r} ({type(value).__name__})"
    if type_name == "str":
        return (value, None) if isinstance(value, str) else (None, bad.format("a string"))
    if type_name == "int":
        return (value, None) if _is_int(value) else (None, bad.format("an integer"))
    if type_name == "float":
        return (float(value), None) if _is_number(value) else (None, bad.format("a number"))
    if type_name == "bool":
        return (value, None) if isinstance(value, bool) else (None, bad.format("true or false"))
    if type_name == "int | None":
        if value == ALL:
            return None, None
        return (value, None) if _is_int(value) else (None, bad.format(f'an integer or "{ALL}"'))
    if type_name == "tuple[int, ...]":
        if isinstance(value, list) and value and all(_is_int(v) for v in value):
            return tuple(value), None
        return None, bad.format("a non-empty list of integers")
    if type_name == "tuple[float, float]":
        if isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value):
            return tuple(float(v) for v in value), None
        return None, bad.format("a list of two numbers")
    return None, f"{name} cannot be set from a spec"


def _unknown(keys, known, where: str) -> list[str]:
    return [f"unknown key {k!r} in {where} (known: {', '.join(known)})"
            for k in keys if k not in known]


def _typed_option(table, key: str, options: tuple[str, ...], problems: list[str]):
    """`sampler` / `pruner`: a name, or a table with `type` and constructor options."""
    value = table.get(key, options[0] if key == "pruner" else "grid")
    if isinstance(value, str):
        kind, extra = value, {}
    elif isinstance(value, dict):
        extra = dict(value)
        kind = extra.pop("type", None)
    else:
        problems.append(f"{key} must be a name or a table with `type`, got {value!r}")
        return None, {}
    if kind not in options:
        problems.append(f"{key} = {kind!r} is not one of {', '.join(options)}")
        return None, {}
    return kind, extra


def _field_problems(base: Config, changes: dict, where: str, base_problems: list[str]):
    """Config.validate() problems that `changes` adds to `base`, located at `where`."""
    try:
        config = base.replace(**changes)
    except TypeError as exc:  # pragma: no cover - keys are checked before
        return [f"{where}: {exc}"]
    return [f"{where}: {p}" for p in config.validate() if p not in base_problems]


def _build(table: dict, name: str, profile: str, path: Path) -> tuple[Spec | None, list[str]]:
    """Merge `profile` into `table` and validate it into a Spec; (spec or None, problems)."""
    problems: list[str] = []
    problems += _unknown(table, TOP_KEYS, "the spec")
    profiles = table.get("profiles", {})
    if not isinstance(profiles, dict):
        problems.append("profiles must be a table of [profiles.<name>] tables")
        profiles = {}
    problems += _unknown(profiles, PROFILES, "[profiles]")
    for pname, ptable in profiles.items():
        if not isinstance(ptable, dict):
            problems.append(f"profiles.{pname} must be a table")
        elif pname in PROFILES:
            problems += _unknown(ptable, PROFILE_KEYS, f"[profiles.{pname}]")
    merged = {k: v for k, v in table.items() if k != "profiles"}
    override = profiles.get(profile, {})
    if isinstance(override, dict):
        merged = _merge(merged, {k: v for k, v in override.items() if k in PROFILE_KEYS})

    description = merged.get("description", "")
    if not isinstance(description, str):
        problems.append("description must be a string")
    suite = merged.get("suite", False)
    if not isinstance(suite, bool):
        problems.append(f"suite must be true or false, got {suite!r}")

    types = Config.field_types()
    settable = [f for f in types if f not in RUNNER_FIELDS]

    def tables(key):
        value = merged.get(key, {})
        if not isinstance(value, dict):
            problems.append(f"[{key}] must be a table, got {value!r}")
            return {}
        return value

    # fixed fields
    fixed: dict[str, Any] = {}
    for key, value in tables("fixed").items():
        if key in RUNNER_FIELDS:
            problems.append(f"fixed.{key} is set by the runner (--device, --jobs, data/), "
                            f"not by a spec; remove it")
        elif key not in types:
            problems += _unknown([key], settable, "[fixed]")
        else:
            coerced, problem = _coerce(key, types[key], value)
            if problem:
                problems.append(f"fixed.{problem}")
            else:
                fixed[key] = coerced

    # sugar: datasets / seeds
    raw_space = dict(tables("space"))
    for sugar, fname in (("datasets", "dataset"), ("seeds", "seed")):
        if sugar not in merged:
            continue
        value = merged[sugar]
        if not isinstance(value, list) or not value:
            problems.append(f"{sugar} must be a non-empty list, got {value!r}")
            continue
        if fname in raw_space or fname in fixed:
            problems.append(f"{sugar} and {fname} in [fixed]/[space] both set {fname}; keep one")
            continue
        if fname == "seed" and not all(_is_int(v) and v >= 0 for v in value):
            problems.append(f"seeds must be integers >= 0, got {value!r}")
            continue
        if len(value) == 1:
            fixed[fname] = value[0]
        else:
            raw_space = {fname: value, **raw_space}

    base_problems: list[str] = []
    base = None
    try:
        base = Config(**fixed)
    except TypeError as exc:  # pragma: no cover - keys are checked above
        problems.append(str(exc))
    if base is not None:
        problems += [f"fixed: {p}" for p in base.validate()]
        base_problems = base.validate()

    # searched dimensions
    dimensions: list[Dimension] = []
    for key, value in raw_space.items():
        if key in RUNNER_FIELDS:
            problems.append(f"space.{key} is set by the runner, not by a spec; remove it")
            continue
        if key not in types:
            problems += _unknown([key], settable, "[space]")
            continue
        if key in fixed:
            problems.append(f"{key} is both fixed and searched; keep one")
            continue
        dim = _dimension(key, types[key], value, problems)
        if dim is None:
            continue
        if base is not None:
            values = dim.choices if dim.is_grid else (dim.low, dim.high)
            for v in values:
                if dim.integer and not dim.is_grid:
                    v = int(v)
                problems += _field_problems(base, {key: v}, f"space.{key}", base_problems)
        dimensions.append(dim)

    # variants: named bundles of fields, one categorical `variant` dimension
    variants: dict[str, dict] = {}
    for vname, bundle in tables("variants").items():
        if not isinstance(bundle, dict):
            problems.append(f"variants.{vname} must be a table of Config fields, got {bundle!r}")
            continue
        fields: dict[str, Any] = {}
        for key, value in bundle.items():
            if key not in types or key in RUNNER_FIELDS:
                problems += _unknown([key], settable, f"[variants.{vname}]")
            elif key in raw_space:
                problems.append(f"variants.{vname} sets {key}, which is also searched; keep one")
            else:
                coerced, problem = _coerce(key, types[key], value)
                if problem:
                    problems.append(f"variants.{vname}.{problem}")
                else:
                    fields[key] = coerced
        if base is not None:
            problems += _field_problems(base, fields, f"variants.{vname}", base_problems)
        variants[vname] = fields
    if "variants" in merged and not variants and isinstance(merged["variants"], dict):
        problems.append("[variants] is empty; add a variant or remove the table")
    if variants:
        dimensions.append(Dimension(VARIANT, choices=tuple(variants)))

    sampler, sampler_options = _typed_option(merged, "sampler", SAMPLERS, problems)
    pruner, pruner_options = _typed_option(merged, "pruner", PRUNERS, problems)

    objectives = merged.get("objectives", {"val/nelbo": "minimize"})
    if not isinstance(objectives, dict) or not objectives:
        problems.append('objectives must be a non-empty table like { "val/nelbo" = "minimize" }')
        objectives = {}
    for metric, direction in objectives.items():
        if metric not in OBJECTIVE_METRICS:
            problems.append(f"objective {metric!r} is not one of {', '.join(OBJECTIVE_METRICS)}")
        if direction not in DIRECTIONS:
            problems.append(f"objective {metric!r} direction {direction!r} is not one of "
                            f"{', '.join(DIRECTIONS)}")

    trials = merged.get("trials")
    if sampler == "grid":
        if trials is not None:
            problems.append("trials is not used by a grid (every point runs once); "
                            "shrink the space in the profile instead")
        if any(not d.is_grid for d in dimensions):
            ranged = [d.name for d in dimensions if not d.is_grid]
            problems.append(f"the grid sampler needs lists, not ranges, for {', '.join(ranged)}")
    elif sampler is not None:
        if not _is_int(trials) or trials < 1:
            problems.append(f"trials must be an integer >= 1 for the {sampler} sampler, "
                            f"got {trials!r}")
        if not dimensions:
            problems.append(f"the search space is empty: the {sampler} sampler needs at least "
                            f"one [space] dimension")
    if pruner not in (None, "none") and len(objectives) > 1:
        problems.append("a pruner needs a single objective (Optuna cannot prune "
                        "multi-objective studies); set pruner = \"none\"")
    problems += _check_options(sampler, sampler_options, pruner, pruner_options)

    if problems or base is None:
        return None, problems
    spec = Spec(
        name=name, profile=profile, path=path, description=description, suite=suite,
        base=base, dimensions=tuple(dimensions), variants=variants,
        sampler=sampler, sampler_options=sampler_options,
        pruner=pruner, pruner_options=pruner_options,
        objectives=tuple(objectives.items()), trials=trials if _is_int(trials) else 1,
        table=merged,
    )
    return spec, []


def _dimension(key: str, type_name: str, value, problems: list[str]) -> Dimension | None:
    """A [space] entry as a Dimension; appends problems and returns None when invalid."""
    if isinstance(value, list):
        if not value:
            problems.append(f"space.{key} is an empty list; give at least one value")
            return None
        choices, ok = [], True
        for v in value:
            coerced, problem = _coerce(key, type_name, v)
            if problem:
                problems.append(f"space.{problem}")
                ok = False
            else:
                choices.append(coerced)
        if ok and len(set(map(repr, choices))) != len(choices):
            problems.append(f"space.{key} lists a value twice: {value!r}")
            ok = False
        return Dimension(key, choices=tuple(choices)) if ok else None
    if isinstance(value, dict):
        unknown = _unknown(value, ("low", "high", "log", "step"), f"space.{key}")
        if unknown:
            problems += unknown
            return None
        if type_name not in ("int", "float"):
            problems.append(f"space.{key} is a {type_name} field: give a list of values, "
                            f"not a range")
            return None
        low, high = value.get("low"), value.get("high")
        log, step = value.get("log", False), value.get("step")
        integer = type_name == "int"
        number = _is_int if integer else _is_number
        ok = True
        for bound_name, bound in (("low", low), ("high", high)):
            if not number(bound):
                kind = "an integer" if integer else "a number"
                problems.append(f"space.{key}.{bound_name} must be {kind}, got {bound!r}")
                ok = False
        if not isinstance(log, bool):
            problems.append(f"space.{key}.log must be true or false, got {log!r}")
            ok = False
        if step is not None and (not number(step) or step <= 0):
            problems.append(f"space.{key}.step must be a positive number, got {step!r}")
            ok = False
        if not ok:
            return None
        if not low < high:
            problems.append(f"space.{key} range is empty: low {low} must be below high {high}")
            return None
        if log and low <= 0:
            problems.append(f"space.{key} is log-uniform, so low must be > 0, got {low}")
            return None
        if log and step is not None:
            problems.append(f"space.{key}: a log range cannot have a step (Optuna)")
            return None
        if not all(math.isfinite(v) for v in (low, high)):
            problems.append(f"space.{key} bounds must be finite")
            return None
        return Dimension(key, low=low, high=high, log=log, step=step, integer=integer)
    problems.append(f"space.{key} must be a list of values or a range table "
                    f"{{ low = .., high = .., log = true }}, got {value!r}")
    return None


def _check_options(sampler, sampler_options, pruner, pruner_options) -> list[str]:
    """Sampler / pruner options must be constructor arguments that the constructor accepts."""
    import optuna

    problems = []
    classes = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler,
               "nsga2": optuna.samplers.NSGAIISampler, "median": optuna.pruners.MedianPruner,
               "hyperband": optuna.pruners.HyperbandPruner}
    for kind, options, what in ((sampler, sampler_options, "sampler"),
                                (pruner, pruner_options, "pruner")):
        if kind is None or not options:
            continue
        if kind not in classes:
            problems.append(f"the {kind} {what} takes no options, got {', '.join(options)}")
            continue
        cls = classes[kind]
        known = [p for p in inspect.signature(cls).parameters if p != "seed"]
        unknown = [k for k in options if k not in known]
        if unknown:
            problems.append(f"unknown {what} option(s) {', '.join(unknown)} for {kind} "
                            f"(known: {', '.join(known)})")
            continue
        bad = [k for k, v in options.items() if isinstance(v, (dict, list))]
        if bad:
            problems.append(f"{what} options must be plain values: {', '.join(bad)}")
            continue
        try:
            cls(**options)
        except (TypeError, ValueError) as exc:
            problems.append(f"{what} options rejected by {cls.__name__}: {exc}")
    return problems


def describe(spec: Spec) -> str:
    """One line per dimension and the budget: what `runner list` prints."""
    dims = "; ".join(d.describe() for d in spec.dimensions) or "no dimensions"
    return (f"{spec.study_name}: {spec.sampler} over {dims}; {spec.size()} trials of "
            f"{spec.base.epochs} epoch(s); objectives "
            + ", ".join(f"{m} ({d})" for m, d in spec.objectives))
