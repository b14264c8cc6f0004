"""The declared format of a study spec file (pydantic models: strict, extra="forbid") and its
validation errors as one-line phrases located by their path in the file.

`study.specs` reads and merges the files and checks what relates several entries; the types,
the keys each table may hold and the ranges Optuna can sample are declared here.
"""

from __future__ import annotations

import copy
import inspect
import typing
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

PROFILES = ("smoke", "default", "full")
SAMPLERS = ("grid", "random", "tpe", "nsga2")
PRUNERS = ("none", "median", "hyperband")
DIRECTIONS = ("minimize", "maximize")
OBJECTIVE_METRICS = tuple(
    [f"val/{k}" for k in ("nelbo", "recon", "kl", "sse", "mse", "active_units")]
    + [f"train/{k}" for k in ("loss", "nelbo", "recon", "kl")]
)
RUNNER_FIELDS = ("device", "threads", "data_root", "extra")  # set by the runner, not by specs
ALL = "all"  # spelling of None for the optional integer fields (TOML has no null)


# --------------------------------------------------------------------------- the models
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
    extends: str | None = None  # followed before validation (specs._resolve_extends)
    profiles: dict[Literal[PROFILES], Profile] = {}


TOP_KEYS, PROFILE_KEYS = tuple(SpecFile.model_fields), tuple(Profile.model_fields)


def set_fields(table: BaseModel, written=()) -> dict[str, Any]:
    """The fields a table set (validated), without the defaults of the others, in the order
    `written` (the raw table's keys) gives them, the others in declaration order. Never in
    the order of `model_fields_set`, a set: a grid's dimensions, hence its points and the
    study's recorded settings, would follow the interpreter's hash seed."""
    order = [*written, *type(table).model_fields]
    return {name: getattr(table, name)
            for name in dict.fromkeys(order) if name in table.model_fields_set}


# --------------------------------------------------------------------------- errors
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


def failed_keys(errors: list[dict]) -> set[str]:
    """The top-level keys of a table that have errors."""
    return {_path(error)[0] for error in errors}


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


def problem(error: dict) -> str:
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


def validated(model: type[BaseModel], table: dict) -> tuple[BaseModel | None, list[dict]]:
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
    if not path:
        return False
    path = path[:{"fixed": 2, "space": 2, "objectives": 2, "profiles": 2, "variants": 3}
                 .get(path[0], 1)]
    for key in path[:-1]:
        table = table.get(key) if isinstance(table, dict) else None
    if isinstance(table, dict) and path[-1] in table:
        del table[path[-1]]
        return True
    return False
