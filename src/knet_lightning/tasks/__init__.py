"""One object per segmentation task (panoptic, instance, semantic): post-processing settings,
ground truth, metrics per stage, overlay and official-format writer."""

from __future__ import annotations

from typing import Any

from knet_lightning.tasks.base import SegmentationTask
from knet_lightning.tasks.instance import InstanceTask
from knet_lightning.tasks.panoptic import PanopticTask
from knet_lightning.tasks.semantic import SemanticTask
from knet_lightning.tasks.settings import InstanceSettings, PanopticSettings, SemanticSettings, TaskSettings

TASKS: dict[str, type[SegmentationTask]] = {t.name: t for t in (PanopticTask, InstanceTask, SemanticTask)}

__all__ = [
    "TASKS",
    "InstanceSettings",
    "InstanceTask",
    "PanopticSettings",
    "PanopticTask",
    "SegmentationTask",
    "SemanticSettings",
    "SemanticTask",
    "TaskSettings",
    "build_task",
]


def build_task(name: str, **kwargs: Any) -> SegmentationTask:
    """The task object called ``name`` (``model.task``)."""
    if name not in TASKS:
        raise ValueError(f"model.task={name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
