"""The base of every config section: strict pydantic models with one-line, named errors.

Every section (model, data, tokenizer, optimizer, ...) subclasses `ConfigNode`; unknown keys are errors that
name the key and its closest valid spelling, before any process group starts. Two rules hold for every section:
no number anywhere in the tree may be infinite or NaN (a `lr: .inf` would skip every step), and a field that is a
list of strings also takes a single string (`train_shards: data/*.zst` is a one-element list).
"""
from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A config problem, as one line per problem: `section.key: what is wrong`."""


class ConfigNode(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _single_string_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), str) and is_list_of_str(field.annotation):
                    data = {**data, name: [data[name]]}
        return data

    @classmethod
    def build(cls, data: dict[str, Any] | None = None, *, where: str = "") -> ConfigNode:
        """Validate `data` into this config; raise ConfigError with readable messages on failure."""
        if problems := non_finite_numbers(data or {}, where):  # also inside free-form dicts (deepspeed_extra)
            raise ConfigError("\n".join(problems))
        try:
            return cls.model_validate(data or {})
        except ValidationError as err:
            raise ConfigError(format_validation_error(cls, err, where)) from None


def non_finite_numbers(tree: Any, where: str = "") -> list[str]:
    """One line per infinite or NaN float anywhere in `tree` (nested dicts and lists), named by its dotted path."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return [f"{where or 'value'}: must be a finite number (got {tree})"]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    return [line for key, value in items for line in non_finite_numbers(value, f"{where}.{key}" if where else str(key))]


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1
    return args[0] if optional else annotation


def is_list_of_str(annotation: Any) -> bool:
    """`list[str]` or `list[str] | None`."""
    annotation = _without_none(annotation)
    return typing.get_origin(annotation) is list and typing.get_args(annotation) == (str,)


def field_annotation(model: type[BaseModel], path: list[str]) -> Any:
    """The declared type at dotted `path` inside `model` (through sections and dicts of sections), or None."""
    cur: Any = model
    for part in path:
        cur = _without_none(cur)
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            if part not in cur.model_fields:
                return None
            cur = cur.model_fields[part].annotation
        elif typing.get_origin(cur) is dict:
            cur = typing.get_args(cur)[1]
        else:
            return None
    return cur


def _field_names(model: type[BaseModel], path: tuple) -> list[str]:
    """Valid keys at `path` inside `model` (walking nested ConfigNode fields)."""
    cur: Any = model
    for part in path:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return []
        cur = cur.model_fields[part].annotation
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def format_validation_error(model: type[BaseModel], err: ValidationError, where: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int))
        dotted = ".".join(str(p) for p in ((where,) if where else ()) + tuple(e["loc"]))
        at = f"{dotted}: " if dotted else ""  # a check of the whole tree names its fields in its message
        if e["type"] == "extra_forbidden":
            valid = _field_names(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            lines.append(f"{at}unknown key{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            got = "" if isinstance(value, (dict, list)) else f" (got {value!r})"  # sections: the msg says it
            lines.append(f"{at}{msg}{got}")
    return "\n".join(lines)
