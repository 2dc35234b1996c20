"""One object per segmentation task (panoptic, instance, semantic): post-processing settings,
ground truth, metrics per stage, overlay and official-format writer.

Owns: the task interface (``base.py``: :class:`SegmentationTask`), one implementation per task
(``panoptic.py``, ``instance.py``, ``semantic.py``), their post-processing settings
(``settings.py``) and :func:`build_task`. The rest of the package asks the task and never
branches on it.

Imports: layer 6 of the package (see :mod:`knet_lightning`), beside checkpoint: a task composes
the post-processing and the metrics of its kind, so it sits above both (layer 5), not between
criterion and postprocess. Today: :mod:`knet_lightning.settings`, :mod:`knet_lightning.constants`,
:mod:`knet_lightning.data.io` (``id2rgb``), :mod:`knet_lightning.models.outputs`
(``StageOutput``), :mod:`knet_lightning.postprocess` (``merge``, ``results``, ``visualize``) and
:mod:`knet_lightning.evaluation` (the metrics and the ``export`` writers). Nothing from
checkpoint (its own layer), inference, training, module, run_data or cli, which import from here.
"""

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
