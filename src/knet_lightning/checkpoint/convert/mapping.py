"""Strict renaming of a published state dict onto this package's networks.

A mapping is an ordered list of ``(source template, target template)`` pairs such as
``("decode_head.kernel_update_head.{i}.attention.attn.{rest}", "kernel_update_heads.{i}.attention.{rest}")``.
``{name}`` matches one dotted component, ``{rest}`` / ``{path}`` any dotted tail; the first pair
whose source template matches a key gives its new name. The same pairs, swapped, map back, so a
round trip is checkable. Conversion is strict: every source tensor is used exactly once, every
target tensor is filled, shapes must be equal, and anything else is one error naming the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache

from torch import Tensor

__all__ = ["ConversionError", "KeyMapping", "convert_state_dict", "kernel_update_head_pairs"]

_GREEDY = ("rest", "path")


class ConversionError(ValueError):
    """A published checkpoint that does not map onto the network (names the file and keys)."""


@cache
def _compile(template: str) -> re.Pattern[str]:
    pattern = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        pattern += re.escape(literal)
        if name:
            pattern += f"(?P<{name}>.+)" if name in _GREEDY else f"(?P<{name}>[^.]+)"
    return re.compile(pattern)


class KeyMapping:
    """Ordered ``(source, target)`` key templates; :meth:`inverse` swaps them."""

    def __init__(self, pairs: Sequence[tuple[str, str]], name: str) -> None:
        self.pairs = tuple(pairs)
        self.name = name

    def target_of(self, key: str) -> str | None:
        for source, target in self.pairs:
            match = _compile(source).fullmatch(key)
            if match:
                return target.format(**match.groupdict())
        return None

    def inverse(self) -> KeyMapping:
        return KeyMapping([(t, s) for s, t in self.pairs], f"inverse of {self.name}")


def kernel_update_head_pairs(source: str, target: str) -> list[tuple[str, str]]:
    """The pairs for one kernel update head, mmcv-built (official ``knet/det/kernel_update_head.py``,
    MMSegmentation's ``knet_head.py``) at ``source`` and ours at ``target`` (both with ``{i}``):
    mmcv's ``MultiheadAttention`` wraps ``attn``, a ``ConvModule`` its ``conv``, and its ``FFN``
    holds ``layers.0 = Sequential(Linear, ReLU, Dropout)``, ``layers.1 = Linear`` where ours is one
    ``Sequential(Linear, ReLU, Dropout, Linear, Dropout)``; every other name is the same."""
    return [
        (f"{source}.attention.attn.{{rest}}", f"{target}.attention.{{rest}}"),
        (f"{source}.feat_transform.conv.{{rest}}", f"{target}.feat_transform.{{rest}}"),
        (f"{source}.ffn.layers.0.0.{{rest}}", f"{target}.ffn.0.{{rest}}"),
        (f"{source}.ffn.layers.1.{{rest}}", f"{target}.ffn.3.{{rest}}"),
        (f"{source}.{{rest}}", f"{target}.{{rest}}"),
    ]


def key_listing(keys: Sequence[str], limit: int = 6) -> str:
    """A few keys by name, or, for many, the modules they sit in (``decode_head.conv_cat.* (6)``)."""
    if len(keys) <= limit:
        return ", ".join(keys)
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(" ")[0].split(".")
        nested = len(parts) > 2 and parts[1] in ("kernel_generate_head", "kernel_update_head", "mask_head")
        module = ".".join(parts[:3] if nested else parts[:2])
        groups[module] = groups.get(module, 0) + 1
    shown = ", ".join(f"{m}.* ({n})" for m, n in list(groups.items())[:limit])
    return shown + (f", ... ({len(groups)} modules)" if len(groups) > limit else "")


def convert_state_dict(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], mapping: KeyMapping, source_name: str
) -> dict[str, Tensor]:
    """``source`` renamed by ``mapping`` into exactly the keys and shapes of ``target``.

    Raises:
        ConversionError: naming ``source_name`` and every unused source key, unfilled or
            twice-filled target key and shape mismatch.
    """
    renamed: dict[str, str] = {}
    unused: list[str] = []
    for key in source:
        new = mapping.target_of(key)
        if new is None or new not in target:
            unused.append(key if new is None or new == key else f"{key} (as {new})")
        else:
            renamed[key] = new
    hits: dict[str, list[str]] = {}
    for key, new in renamed.items():
        hits.setdefault(new, []).append(key)
    twice = [f"{new} <- {' and '.join(keys)}" for new, keys in hits.items() if len(keys) > 1]
    missing = [key for key in target if key not in hits]
    shapes = [
        f"{key} {tuple(source[key].shape)} -> {new} {tuple(target[new].shape)}"
        for key, new in renamed.items()
        if tuple(source[key].shape) != tuple(target[new].shape)
    ]
    problems = []
    if unused:
        problems.append(f"{len(unused)} source tensors have no place in the network: {key_listing(unused)}")
    if missing:
        problems.append(f"{len(missing)} network tensors are not in the checkpoint: {key_listing(missing)}")
    if twice:
        problems.append(f"filled twice: {key_listing(twice)}")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ: {', '.join(shapes[:4])}{', ...' if len(shapes) > 4 else ''}")
    if problems:
        raise ConversionError(f"{source_name} does not match this network ({mapping.name}): " + "; ".join(problems))
    return {renamed_key: source[key] for key, renamed_key in renamed.items()}
