"""Typed settings read from a config mapping: an unknown key is an error that names it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

_T = TypeVar("_T")


def settings_from(cls: type[_T], values: Mapping[str, Any] | None, key: str) -> _T:
    """The dataclass ``cls`` from a (possibly partial) mapping; ``key`` is the config key it was
    read from, named in the error together with the valid keys."""
    values = dict(values or {})
    valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {unknown}; valid keys: {valid or 'none'}")
    return cls(**values)
