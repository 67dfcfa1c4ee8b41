"""The base of every config section: strict pydantic models with one-line, named errors.

Every section (model, data, tokenizer, optimizer, ...) subclasses `ConfigNode`; unknown keys are errors that
name the key and its closest valid spelling, before any process group starts.
"""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config problem, as one line per problem: `section.key: what is wrong`."""


class ConfigNode(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def build(cls, data: dict[str, Any] | None = None, *, where: str = "") -> ConfigNode:
        """Validate `data` into this config; raise ConfigError with readable messages on failure."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as err:
            raise ConfigError(format_validation_error(cls, err, where)) from None


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
        if e["type"] == "extra_forbidden":
            valid = _field_names(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            lines.append(f"{dotted}: unknown key{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            got = "" if isinstance(value, (dict, list)) else f" (got {value!r})"  # sections: the msg says it
            lines.append(f"{dotted}: {msg}{got}")
    return "\n".join(lines)
