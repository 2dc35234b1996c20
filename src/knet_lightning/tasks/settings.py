"""Typed post-processing settings of each task, the one place their defaults are written.

``conf/`` reads them through Hydra's ConfigStore (``model/postprocess`` group, see
:func:`knet_lightning.configs.register_configs`), so a misspelled key in an experiment file
fails at composition; :meth:`TaskSettings.from_config` checks the same for settings given in
Python, and every value is range-checked when the task object is built, before any step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, TypeVar

from knet_lightning.settings import settings_from

_S = TypeVar("_S", bound="TaskSettings")

MERGE_METHODS = ("auto", "sparse", "dense")


def _unit_interval(owner: str, name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"model.postprocess.{name}={value}: expected a value in [0, 1] ({owner})")


@dataclass
class TaskSettings:
    """Base of the per-task settings; subclasses list their fields with defaults."""

    task: ClassVar[str] = ""

    @classmethod
    def from_config(cls: type[_S], values: Mapping[str, Any] | None) -> _S:
        """The settings from a (possibly partial) mapping; an unknown key is an error that
        names it and lists the valid ones."""
        return settings_from(cls, values, f"model.postprocess ({cls.task} task)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PanopticSettings(TaskSettings):
    """The panoptic merge of the official ``get_panoptic`` / ``merge_stuff_thing``.

    Attributes:
        object_mask_thr: thing kernels scoring below this are dropped.
        overlap_thr: a segment is kept when its visible area is at least this fraction of its
            mask's area.
        mask_thr: threshold of a kernel's sigmoid mask.
        method: ``dense`` (the official full-resolution maps), ``sparse`` (per-cell bounds and
            exact values only where they overlap; equal up to float ties) or ``auto`` (sparse on
            CPU, dense on GPU).
    """

    task: ClassVar[str] = "panoptic"
    object_mask_thr: float = 0.3
    overlap_thr: float = 0.6
    mask_thr: float = 0.5
    method: str = "auto"

    def __post_init__(self) -> None:
        for name in ("object_mask_thr", "overlap_thr", "mask_thr"):
            _unit_interval("panoptic", name, getattr(self, name))
        if self.method not in MERGE_METHODS:
            raise ValueError(f"model.postprocess.method={self.method!r}: expected one of {MERGE_METHODS}")


@dataclass
class InstanceSettings(TaskSettings):
    """The instance top-k of the official ``get_results`` (no NMS).

    Attributes:
        max_per_img: (kernel, class) pairs kept per image.
        mask_thr: threshold of a kernel's sigmoid mask.
    """

    task: ClassVar[str] = "instance"
    max_per_img: int = 100
    mask_thr: float = 0.5

    def __post_init__(self) -> None:
        if int(self.max_per_img) < 1:
            raise ValueError(f"model.postprocess.max_per_img={self.max_per_img}: expected an integer >= 1")
        _unit_interval("instance", "mask_thr", self.mask_thr)


@dataclass
class SemanticSettings(TaskSettings):
    """Semantic inference is a per-pixel argmax: nothing to set."""

    task: ClassVar[str] = "semantic"
