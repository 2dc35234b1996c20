"""Typed settings read from a config mapping (an unknown key is an error that names it), and the
config keys a command line's overrides name."""

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


def override_key(item: str) -> str:
    """The config key (or group) a Hydra command-line override names: ``model.x`` for
    ``model.x=1``, ``+model.x=1``, ``++model.x=1`` and ``~model.x``; ``trainer`` for ``trainer=ddp``.
    Readers of ``overrides.task`` decide what a parent key or a group choice means to them."""
    return item.split("=", 1)[0].lstrip("+~")


def command_line_overrides() -> list[str]:
    """This run's command-line overrides (Hydra's ``overrides.task``; none outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
