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

The format is declared as pydantic models (`SpecFile`, `Profile`, `Range`, and `ConfigFields`
/ `SpaceFields` built from Config's field types); by hand are only the extends chain, the
profile merge and the checks that relate several entries.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

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


# --------------------------------------------------------------------------- the schema
# Strict, so `true` is not an integer and "3" is not a number; closed (extra="forbid"), so a
# misspelt key is an error, not a setting silently left at its default.


class _Table(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def _all_is_none(value):
    """TOML has no null: an optional integer field spells None "all"."""
    if value == ALL:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise PydanticCustomError("int_or_all", f'must be an integer or "{ALL}"')


def _spec_type(hint):
    """A Config field's type as a spec writes it: TOML has no tuples and no null."""
    if typing.get_origin(hint) is tuple:
        as_tuple = BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
        return Annotated[hint, as_tuple, Field(min_length=1)]
    if type(None) in typing.get_args(hint):
        return Annotated[hint, BeforeValidator(_all_is_none)]
    return hint

N = TypeVar("N", int, float)


class Range(_Table, Generic[N]):
    """A searched number, uniform (log-uniform with `log`) in [low, high], on `step`s if given."""

    model_config = ConfigDict(allow_inf_nan=False)
    low: N
    high: N
    log: bool = False
    step: Annotated[N, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _optuna_can_sample_it(self):
        if not self.low < self.high:
            raise ValueError(f"range is empty: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"is log-uniform, so low must be > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("cannot have both log = true and a step (Optuna)")
        return self


def _not_a_range(value):
    raise PydanticCustomError("not_a_range", "takes a list of values, not a range (ranges are "
                              "for integer and float fields)")


def _space_type(hint):
    """A [space] entry: a non-empty list of values, or a range of an int or float field."""
    values = Annotated[list[_spec_type(hint)], Field(min_length=1), Tag("<list>")]
    ranges = Range[hint] if hint in (int, float) else Annotated[Any, AfterValidator(_not_a_range)]
    kind = Discriminator(
        lambda v: "<list>" if isinstance(v, list) else "<range>" if isinstance(v, dict) else None,
        custom_error_type="list_or_range", custom_error_message="must be a list of values or a "
        "range table { low = .., high = .., log = true }")
    return Annotated[values | Annotated[ranges, Tag("<range>")], kind]

_HINTS = typing.get_type_hints(Config)  # real types, where the annotations are strings
SETTABLE = tuple(name for name in Config.field_names() if name not in RUNNER_FIELDS)
# Every field optional: a table sets some, and `model_fields_set` says which.
ConfigFields = create_model("ConfigFields", __base__=_Table,
                            **{name: (_spec_type(_HINTS[name]), None) for name in SETTABLE})
SpaceFields = create_model("SpaceFields", __base__=_Table,
                           **{name: (_space_type(_HINTS[name]), None) for name in SETTABLE})


class _Sampler(_Table):
    """`sampler = { type = "tpe", ... }`: the other keys are options of Optuna's constructor."""

    model_config = ConfigDict(extra="allow")
    type: Literal[SAMPLERS]

    @model_validator(mode="after")
    def _the_constructor_accepts_the_options(self):
        import optuna  # slow to import, and only a table with options needs it

        options = self.model_extra
        cls = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler,
               "nsga2": optuna.samplers.NSGAIISampler, "median": optuna.pruners.MedianPruner,
               "hyperband": optuna.pruners.HyperbandPruner}.get(self.type)
        if not options:
            return self
        if cls is None:
            raise ValueError(f"takes no options for {self.type}, got {', '.join(options)}")
        known = [p for p in inspect.signature(cls).parameters if p != "seed"]
        if unknown := [k for k in options if k not in known]:
            raise ValueError(f"has unknown option(s) {', '.join(unknown)} for {self.type} "
                             f"(known: {', '.join(known)})")
        if bad := [k for k, v in options.items() if isinstance(v, (dict, list))]:
            raise ValueError(f"options must be plain values: {', '.join(bad)}")
        try:
            cls(**options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options rejected by {cls.__name__}: {exc}") from None
        return self


class _Pruner(_Sampler):
    type: Literal[PRUNERS]


def _choice(names: tuple[str, ...], table: type[_Sampler]):
    """A sampler or pruner: a name, or a table with `type` and options."""
    name = Annotated[Literal[names], Tag("<name>")]
    kind = Discriminator(lambda v: "<table>" if isinstance(v, dict) else "<name>")
    return Annotated[name | Annotated[table, Tag("<table>")], kind]

SamplerChoice, PrunerChoice = _choice(SAMPLERS, _Sampler), _choice(PRUNERS, _Pruner)
Seed = Annotated[int, Field(ge=0)]


class Profile(_Table):
    """What a [profiles.<name>] table may set (and the top level of a spec)."""

    sampler: SamplerChoice = "grid"
    pruner: PrunerChoice = "none"
    objectives: Annotated[dict[Literal[OBJECTIVE_METRICS], Literal[DIRECTIONS]],
                          Field(min_length=1)] = {"val/nelbo": "minimize"}
    trials: Annotated[int, Field(ge=1)] | None = None
    datasets: Annotated[list[str], Field(min_length=1)] | None = None
    seeds: Annotated[list[Seed], Field(min_length=1)] | None = None
    fixed: ConfigFields = ConfigFields()
    space: SpaceFields = SpaceFields()
    variants: dict[str, ConfigFields] = {}


class SpecFile(Profile):
    """A spec file's top level."""

    description: str = ""
    suite: bool = False
    extends: str | None = None  # followed before validation, by _resolve_extends
    profiles: dict[Literal[PROFILES], Profile] = {}

TOP_KEYS, PROFILE_KEYS = tuple(SpecFile.model_fields), tuple(Profile.model_fields)


def _set_fields(table: BaseModel) -> dict[str, Any]:
    """The fields a table set (validated), without the defaults of the others."""
    return {name: getattr(table, name) for name in table.model_fields_set}


# --------------------------------------------------------------------------- schema errors
# pydantic's errors as phrases located by their path in the file, such as
# `fixed.latent_dim must be an integer, got 'x' (str)`.

_TAGS = ("<list>", "<range>", "<name>", "<table>")  # union members in pydantic's locations
_MUST = {
    "int_type": "must be an integer", "float_type": "must be a number",
    "bool_type": "must be true or false", "string_type": "must be a string",
    "list_type": "must be a list", "tuple_type": "must be a list", "dict_type": "must be a table",
    "model_type": "must be a table", "finite_number": "must be a finite number",
    "greater_than": "must be > {gt:g}", "greater_than_equal": "must be >= {ge:g}",
    "too_short": "must have at least {min_length} items",
    "too_long": "must have at most {max_length} items",
}


def _path(error: dict) -> list:
    return [part for part in error["loc"] if part not in _TAGS]


def _where(path: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _known(table: list) -> tuple[str, ...]:
    """The keys of the table at `table`, for an unknown key's message."""
    if table[:1] == ["profiles"]:
        return PROFILES if len(table) == 1 else _known(table[2:]) if len(table) > 2 \
            else PROFILE_KEYS
    if table[:1] == ["space"] and len(table) == 2:
        return tuple(Range.model_fields)
    return OBJECTIVE_METRICS if table == ["objectives"] else SETTABLE if table else TOP_KEYS


def _problem(error: dict) -> str:
    """One pydantic error as one phrase."""
    path, kind, value = _path(error), error["type"], error["input"]
    if path[-1:] == ["[key]"]:  # a key outside its Literal: a profile, a metric
        path, kind = path[:-1], "extra_forbidden"
    where = _where(path)
    if kind == "extra_forbidden":
        table, known = path[:-1], _known(path[:-1])
        if path[-1] in RUNNER_FIELDS and known == SETTABLE:
            return f"{where} is set by the runner (--device, --jobs, data/), not by a spec; remove it"
        return (f"unknown key {path[-1]!r} in {f'[{_where(table)}]' if table else 'the spec'} "
                f"(known: {', '.join(known)})")
    if kind == "literal_error":  # worded as Config.validate() words it
        options = error["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return f"{where} = {value!r} is not one of {options}"
    if kind == "too_short" and not value:
        what = "table; give at least one entry" if value == {} else "list; give at least one value"
        return f"{where} is an empty {what}"
    if kind == "missing":
        return f"{where} is missing"
    if kind == "value_error":  # a validator of this module: the message names the values
        return f"{where} {error['msg'].removeprefix('Value error, ')}"
    must = _MUST[kind].format(**error.get("ctx", {})) if kind in _MUST else error["msg"]
    return f"{where} {must}, got {value!r} ({type(value).__name__})"


def _validated(model: type[BaseModel], table: dict) -> tuple[BaseModel | None, list[dict]]:
    """`table` validated by `model`, leaving out the entries that fail: (instance, errors).

    Leaving out a bad entry rather than the whole table lets the checks after the schema run on
    the rest, so that every problem of a file is reported together. The errors are the first
    pass's: later ones only see what leaving entries out did (an emptied table, say)."""
    table, first = copy.deepcopy(table), None
    while True:
        try:
            return model.model_validate(table), first or []
        except ValidationError as exc:
            first = exc.errors() if first is None else first
            if not [_drop(table, _path(error)) for error in exc.errors()].count(True):
                return None, first


def _drop(table: dict, path: list) -> bool:
    """Remove the entry a failed value belongs to: a field, a dimension, a variant's field."""
    path = path[:{"fixed": 2, "space": 2, "objectives": 2, "profiles": 2, "variants": 3}
                 .get(path[0], 1)]
    for key in path[:-1]:
        table = table.get(key) if isinstance(table, dict) else None
    if isinstance(table, dict) and path[-1] in table:
        del table[path[-1]]
        return True
    return False


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
    # The schema's problems are located in the file as written (profiles.smoke.fixed.epochs);
    # a merged profile holds only values checked there, so its own errors would repeat them.
    problems = [_problem(error) for error in _validated(SpecFile, table)[1]]
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


def _build(table: dict, path: Path, profile: str) -> tuple[Spec | None, list[str]]:
    """The Spec of one profile, or None and the problems of the entries taken together."""
    merged = {k: v for k, v in table.items() if k != "profiles"}
    profiles = table.get("profiles")
    override = profiles.get(profile) if isinstance(profiles, dict) else None
    if isinstance(override, dict):
        merged = _merge(merged, {k: v for k, v in override.items() if k in PROFILE_KEYS})
    data, errors = _validated(SpecFile, merged)
    if data is None:
        return None, []
    failed = {_path(error)[0] for error in errors}  # left out: checks on them would mislead
    fixed, space, problems = _sugar(data, _set_fields(data.fixed), _set_fields(data.space))
    base = Config(**fixed)
    base_problems = base.validate()
    problems += [f"fixed: {p}" for p in base_problems]
    dimensions, variants = [], {}
    for name, value in space.items():
        dimension, found = _dimension(name, value, fixed, base, base_problems)
        dimensions += [dimension] if dimension else []
        problems += found
    for name, bundle in data.variants.items():
        fields = _set_fields(bundle)
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
                              step=value.step, integer=_HINTS[name] is int)
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
