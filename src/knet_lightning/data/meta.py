"""Class metadata shared by readers, the model, the metrics and the exporters.

Every data set is mapped onto one contiguous label space with the thing classes
first, ``[0, num_things)``, then the stuff classes, ``[num_things, num_classes)``.
K-Net relies on this order: panoptic stuff kernel ``k`` is class ``num_things + k``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClassInfo", "DatasetError", "UnknownCategoryError", "default_palette"]


class DatasetError(ValueError):
    """A data set on disk is missing, malformed or inconsistent.

    The message always names the offending file (or field) and what was expected.
    """


class UnknownCategoryError(KeyError):
    """A data-set category id that the :class:`ClassInfo` does not know."""

    def __str__(self) -> str:
        # KeyError quotes its argument; a readable sentence is more useful here.
        return str(self.args[0]) if self.args else ""


def default_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """Deterministic, well-spread RGB colours for ``n`` classes.

    Hues step by the golden ratio so that neighbouring class ids get distant colours;
    saturation and value alternate so that classes with close hues still differ.
    """
    import colorsys

    colors = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        sat = 0.55 + 0.35 * ((i // 3) % 2)
        val = 0.95 - 0.25 * (i % 3) / 2
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(colors)


@dataclass(frozen=True)
class ClassInfo:
    """Names, thing/stuff flags, colours and data-set ids of the contiguous classes.

    Index ``i`` of every tuple describes contiguous class ``i``. Things come first.
    """

    names: tuple[str, ...]
    isthing: tuple[bool, ...]
    colors: tuple[tuple[int, int, int], ...]
    dataset_ids: tuple[int, ...]
    _to_contiguous: dict[int, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Normalise containers so that from_dict(to_dict()) compares equal and the
        # object stays hashable whatever sequences the caller passed.
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "isthing", tuple(bool(t) for t in self.isthing))
        object.__setattr__(self, "colors", tuple(tuple(int(v) for v in c) for c in self.colors))
        object.__setattr__(self, "dataset_ids", tuple(int(i) for i in self.dataset_ids))
        n = len(self.names)
        for name in ("isthing", "colors", "dataset_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"ClassInfo.{name} has {len(getattr(self, name))} entries, expected {n} (one per name)"
                )
        if n == 0:
            raise ValueError("ClassInfo needs at least one class")
        num_things = sum(self.isthing)
        if any(self.isthing[num_things:]):
            raise ValueError(
                f"ClassInfo.isthing must list all thing classes before the stuff classes, got {self.isthing}"
            )
        for i, c in enumerate(self.colors):
            if len(c) != 3 or not all(0 <= v <= 255 for v in c):
                raise ValueError(f"ClassInfo.colors[{i}] = {c} is not an RGB triple in 0..255")
        mapping: dict[int, int] = {}
        for i, d in enumerate(self.dataset_ids):
            if d in mapping:
                raise ValueError(f"ClassInfo.dataset_ids has duplicate id {d}")
            mapping[d] = i
        object.__setattr__(self, "_to_contiguous", mapping)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_things(self) -> int:
        return sum(self.isthing)

    @property
    def num_stuff(self) -> int:
        return self.num_classes - self.num_things

    @property
    def thing_names(self) -> tuple[str, ...]:
        return self.names[: self.num_things]

    @property
    def stuff_names(self) -> tuple[str, ...]:
        return self.names[self.num_things :]

    def contiguous_id(self, dataset_id: int) -> int:
        """Contiguous class index of a data-set category id.

        Raises:
            UnknownCategoryError: (a ``KeyError``) for an id not in ``dataset_ids``.
        """
        try:
            return self._to_contiguous[int(dataset_id)]
        except KeyError:
            raise UnknownCategoryError(
                f"unknown category id {dataset_id}; known ids: {sorted(self._to_contiguous)}"
            ) from None

    def dataset_id(self, contiguous_id: int) -> int:
        """Data-set category id of a contiguous class index (for exporters)."""
        if not 0 <= int(contiguous_id) < self.num_classes:
            raise IndexError(f"contiguous class id {contiguous_id} out of range [0, {self.num_classes})")
        return self.dataset_ids[int(contiguous_id)]

    @classmethod
    def from_coco_categories(
        cls,
        categories: Sequence[Mapping[str, Any]],
        source: str,
        default_isthing: bool | None = None,
    ) -> ClassInfo:
        """Build from a COCO ``categories`` list.

        Things are placed first; the JSON order is kept within things and within stuff.
        ``color`` is taken from the JSON when present, else from :func:`default_palette`.

        Args:
            categories: list of dicts with ``id``, ``name`` and (panoptic) ``isthing``.
            source: file the list came from, for error messages.
            default_isthing: value for categories without ``isthing`` (COCO *instance*
                JSON has none: pass ``True``). ``None`` makes a missing key an error.

        Raises:
            DatasetError: missing keys, bad values or duplicate ids, naming ``source``.
        """
        if not isinstance(categories, Sequence) or isinstance(categories, (str, bytes)):
            raise DatasetError(f"{source}: 'categories' must be a list, got {type(categories).__name__}")
        if len(categories) == 0:
            raise DatasetError(f"{source}: 'categories' is empty")
        parsed: list[tuple[int, str, bool, tuple[int, int, int] | None]] = []
        seen: set[int] = set()
        for i, cat in enumerate(categories):
            if not isinstance(cat, Mapping):
                raise DatasetError(f"{source}: categories[{i}] must be an object, got {cat!r}")
            for key in ("id", "name"):
                if key not in cat:
                    raise DatasetError(f"{source}: categories[{i}] is missing key '{key}'")
            if "isthing" in cat:
                isthing = bool(cat["isthing"])
            elif default_isthing is not None:
                isthing = bool(default_isthing)
            else:
                raise DatasetError(f"{source}: categories[{i}] is missing key 'isthing'")
            try:
                cid = int(cat["id"])
            except (TypeError, ValueError):
                raise DatasetError(f"{source}: categories[{i}]['id'] must be an integer, got {cat['id']!r}") from None
            if cid in seen:
                raise DatasetError(f"{source}: duplicate category id {cid} in 'categories'")
            seen.add(cid)
            color = None
            if "color" in cat:
                c = cat["color"]
                if (
                    not isinstance(c, Sequence)
                    or len(c) != 3
                    or not all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                ):
                    raise DatasetError(f"{source}: categories[{i}]['color'] must be 3 integers in 0..255, got {c!r}")
                color = (int(c[0]), int(c[1]), int(c[2]))
            parsed.append((cid, str(cat["name"]), isthing, color))
        ordered = [p for p in parsed if p[2]] + [p for p in parsed if not p[2]]
        palette = default_palette(len(ordered))
        return cls(
            names=tuple(p[1] for p in ordered),
            isthing=tuple(p[2] for p in ordered),
            colors=tuple(p[3] if p[3] is not None else palette[i] for i, p in enumerate(ordered)),
            dataset_ids=tuple(p[0] for p in ordered),
        )

    def to_dict(self) -> dict[str, list]:
        """Plain lists (JSON/YAML/checkpoint friendly)."""
        return {
            "names": list(self.names),
            "isthing": list(self.isthing),
            "colors": [list(c) for c in self.colors],
            "dataset_ids": list(self.dataset_ids),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassInfo:
        """Inverse of :meth:`to_dict`."""
        missing = [k for k in ("names", "isthing", "colors", "dataset_ids") if k not in d]
        if missing:
            raise ValueError(f"ClassInfo.from_dict: missing key(s) {missing}")
        return cls(
            names=tuple(d["names"]),
            isthing=tuple(d["isthing"]),
            colors=tuple(tuple(c) for c in d["colors"]),
            dataset_ids=tuple(d["dataset_ids"]),
        )
