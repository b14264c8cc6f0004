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

Types, keys and ranges are declared in `study.spec_schema` (pydantic); here are the extends
chain, the profile merge and the checks that relate several entries.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.config import Config
from study.errors import UsageError
from study.spec_schema import (
    ALL,
    OBJECTIVE_METRICS,
    PROFILE_KEYS,
    PROFILES,
    Range,
    SpecFile,
    failed_keys,
    problem,
    set_fields,
    validated,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ALL", "OBJECTIVE_METRICS", "PROFILES", "VARIANT", "Dimension", "Spec", "describe",
           "load_spec", "spec_names", "spec_path", "study_name", "suite_names", "toml_value"]

SPEC_DIR = Path(__file__).with_name("specs")
MERGED_TABLES = ("fixed", "space", "variants")  # merged entry by entry; other keys replace
VARIANT = "variant"

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


def toml_value(text: str):
    """`text` as a TOML value reads (4, 1e-3, true, [400, 200]), else the text itself
    (likelihood=gaussian on a command line)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


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
    # The schema's problems are located in the file as written (profiles.smoke.fixed.epochs);
    # a merged profile holds only values checked there, so its own errors would repeat them.
    problems = [problem(error) for error in validated(SpecFile, table)[1]]
    spec = None
    seen: set[str] = set()
    for name in (profile, *[p for p in PROFILES if p != profile]):
        built, found = _build(table, path, name)
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


# --------------------------------------------------------------------------- what types cannot say


def _keys(table, key: str) -> list:
    """The keys of `table[key]` as written, when it is a table."""
    value = table.get(key) if isinstance(table, dict) else None
    return list(value) if isinstance(value, dict) else []


def _build(table: dict, path: Path, profile: str) -> tuple[Spec | None, list[str]]:
    """The Spec of one profile, or None and the problems of the entries taken together."""
    merged = {k: v for k, v in table.items() if k != "profiles"}
    profiles = table.get("profiles")
    override = profiles.get(profile) if isinstance(profiles, dict) else None
    if isinstance(override, dict):
        merged = _merge(merged, {k: v for k, v in override.items() if k in PROFILE_KEYS})
    data, errors = validated(SpecFile, merged)
    if data is None:
        return None, []
    failed = failed_keys(errors)  # left out: checks on them would mislead
    fixed, space, problems = _sugar(data, set_fields(data.fixed, _keys(merged, "fixed")),
                                    set_fields(data.space, _keys(merged, "space")))
    base = Config(**fixed)
    base_problems = base.validate()
    problems += [f"fixed: {p}" for p in base_problems]
    dimensions, variants = [], {}
    for name, value in space.items():
        dimension, found = _dimension(name, value, fixed, base, base_problems)
        dimensions += [dimension] if dimension else []
        problems += found
    for name, bundle in data.variants.items():
        fields = set_fields(bundle, _keys(merged.get("variants", {}), name))
        problems += [f"variants.{name} sets {k}, which is also searched; keep one"
                     for k in fields if k in space]
        fields = {k: v for k, v in fields.items() if k not in space}
        problems += _field_problems(base, fields, f"variants.{name}", base_problems)
        variants[name] = fields
    if "variants" in data.model_fields_set and not variants and "variants" not in failed:
        problems.append("[variants] is empty; add a variant or remove the table")
    if variants:
        dimensions.append(Dimension(VARIANT, choices=tuple(variants)))
    problems += _search_problems(data, failed, dimensions)
    if problems or errors:
        return None, problems
    (sampler, sampler_options), (pruner, pruner_options) = _kind(data.sampler), _kind(data.pruner)
    return Spec(
        name=path.stem, profile=profile, path=path, description=data.description,
        suite=data.suite, base=base, dimensions=tuple(dimensions), variants=variants,
        sampler=sampler, sampler_options=sampler_options,
        pruner=pruner, pruner_options=pruner_options,
        objectives=tuple(data.objectives.items()), trials=data.trials or 1, table=merged,
    ), []


def _sugar(data: SpecFile, fixed: dict, space: dict) -> tuple[dict, dict, list[str]]:
    """`datasets` / `seeds` as a fixed field (one value) or a first dimension (several)."""
    problems = []
    for sugar, name in (("datasets", "dataset"), ("seeds", "seed")):
        values = getattr(data, sugar)
        if values is None:
            continue
        if name in space or name in fixed:
            problems.append(f"{sugar} and {name} in [fixed]/[space] both set {name}; keep one")
        elif len(values) == 1:
            fixed[name] = values[0]
        else:
            space = {name: values, **space}
    return fixed, space, problems


def _dimension(name: str, value, fixed: dict, base: Config, base_problems: list[str]):
    """A [space] entry as (Dimension or None, problems), its values checked by Config.validate()."""
    if name in fixed:
        return None, [f"{name} is both fixed and searched; keep one"]
    if isinstance(value, Range):
        dimension = Dimension(name, low=value.low, high=value.high, log=value.log,
                              step=value.step, integer=isinstance(value, Range[int]))
        value = [value.low, value.high]
    elif len(set(map(repr, value))) == len(value):
        dimension = Dimension(name, choices=tuple(value))
    else:
        return None, [f"space.{name} lists a value twice: {value!r}"]
    where = f"space.{name}"
    return dimension, [p for v in value for p in _field_problems(base, {name: v}, where,
                                                                 base_problems)]


def _field_problems(base: Config, changes: dict, where: str, base_problems: list[str]):
    """Config.validate() problems that `changes` adds to `base`, located at `where`."""
    return [f"{where}: {p}" for p in base.replace(**changes).validate() if p not in base_problems]


def _kind(choice) -> tuple[str, dict]:
    """A validated sampler or pruner as (name, constructor options)."""
    return (choice, {}) if isinstance(choice, str) else (choice.type, dict(choice.model_extra))


def _search_problems(data: SpecFile, failed: set[str], dimensions) -> list[str]:
    """What the sampler and the pruner need of the trials, the space and the objectives."""
    sampler = None if "sampler" in failed else _kind(data.sampler)[0]
    problems = []
    if sampler == "grid":
        if data.trials is not None:
            problems.append("trials is not used by a grid (every point runs once); "
                            "shrink the space in the profile instead")
        if ranged := [d.name for d in dimensions if not d.is_grid]:
            problems.append(f"the grid sampler needs lists, not ranges, for {', '.join(ranged)}")
    elif sampler is not None:
        if data.trials is None and "trials" not in failed:
            problems.append(f"trials must be an integer >= 1 for the {sampler} sampler "
                            f"(trials to finish); add trials = N")
        if not dimensions and "space" not in failed:
            problems.append(f"the search space is empty: the {sampler} sampler needs at least "
                            f"one [space] dimension")
    if "pruner" not in failed and _kind(data.pruner)[0] != "none" and len(data.objectives) > 1:
        problems.append("a pruner needs a single objective (Optuna cannot prune "
                        "multi-objective studies); set pruner = \"none\"")
    return problems


def describe(spec: Spec) -> str:
    """One line per dimension and the budget: what `runner list` prints."""
    dims = "; ".join(d.describe() for d in spec.dimensions) or "no dimensions"
    return (f"{spec.study_name}: {spec.sampler} over {dims}; {spec.size()} trials of "
            f"{spec.base.epochs} epoch(s); objectives "
            + ", ".join(f"{m} ({d})" for m, d in spec.objectives))
