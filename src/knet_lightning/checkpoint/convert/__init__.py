"""Published K-Net checkpoints into this package's checkpoints (``mode=convert``): the official
release's MMDetection 2.x checkpoints (panoptic, instance) and MMSegmentation's (semantic).

``python -m knet_lightning mode=convert experiment=<name> convert_source=SRC.pth [convert_output=DST.ckpt]``
builds the experiment's network, maps the published ``state_dict`` onto it strictly
(:mod:`knet_lightning.checkpoint.convert.mapping`), checks the class list against the experiment's data
set and writes a checkpoint that ``mode=eval`` / ``mode=predict`` read with ``ckpt_path=`` and a
new training run starts from with ``load_from=`` (weights only, no optimizer state). Nothing is
written unless every check passes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning

from knet_lightning.checkpoint.convert.backbones import backbone_from_published, backbone_layout
from knet_lightning.checkpoint.convert.mapping import ConversionError, KeyMapping, convert_state_dict
from knet_lightning.checkpoint.convert.mmdet import MMDET_KNET
from knet_lightning.checkpoint.convert.mmseg import MMSEG_SEMANTIC
from knet_lightning.checkpoint.convert.reading import PublishedCheckpoint, read_published_checkpoint
from knet_lightning.checkpoint.io import atomic_torch_save, checkpoint_entry
from knet_lightning.checkpoint.keys import CONVERSION_KEY, INFERENCE_KEY, MODEL_CONFIG_KEY

__all__ = [
    "CONVERSION_KEY",
    "MAPPINGS",
    "ConversionError",
    "conversion_record",
    "convert_checkpoint",
    "mapping_for_task",
]

log = logging.getLogger(__name__)

# model.task -> the published layout its checkpoints have
MAPPINGS: dict[str, KeyMapping] = {"semantic": MMSEG_SEMANTIC, "panoptic": MMDET_KNET, "instance": MMDET_KNET}


def conversion_record(path: str | Path) -> dict[str, Any] | None:
    """The :data:`CONVERSION_KEY` record of checkpoint ``path`` (None: not written by ``mode=convert``)."""
    return checkpoint_entry(path, CONVERSION_KEY)


def mapping_for_task(task: str) -> KeyMapping:
    if task not in MAPPINGS:
        raise ConversionError(
            f"mode=convert: model.task={task!r} has no published-checkpoint mapping yet; "
            f"supported: {', '.join(sorted(MAPPINGS))}"
        )
    return MAPPINGS[task]


def _same_name(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def check_classes(published: PublishedCheckpoint, class_names: Sequence[str]) -> None:
    """The checkpoint's class list (where it has one) must be the data set's, in order."""
    classes = published.classes
    if classes is None:
        log.warning(
            "%s records no class list (meta.dataset_meta.classes / meta.CLASSES); only the "
            "class count is checked, by the classifier shapes",
            published.path,
        )
        return
    if len(classes) != len(class_names) or not all(map(_same_name, classes, class_names)):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(classes, class_names)) if not _same_name(a, b)]
        raise ConversionError(
            f"{published.path} was trained on other classes than the experiment's data set: "
            f"{len(classes)} classes in the checkpoint, {len(class_names)} in the data set"
            + (f"; first differences {', '.join(diff[:5])}" if diff else "")
        )


def convert_checkpoint(
    source: str | Path, output: str | Path, module: Any, class_names: Sequence[str]
) -> dict[str, Any]:
    """Convert ``source`` for ``module`` (a :class:`~knet_lightning.module.KNetModule`) into ``output``.

    Returns the record stored under :data:`CONVERSION_KEY`. Raises :class:`ConversionError`
    (and writes nothing) on any mismatch.
    """
    mapping = mapping_for_task(module.task.name)
    published = read_published_checkpoint(source)
    check_classes(published, class_names)
    source_state = backbone_from_published(published.state_dict, module.net.backbone)
    net_state = convert_state_dict(source_state, module.net.state_dict(), mapping, str(published.path))
    module.net.load_state_dict(net_state, strict=True)
    record = {
        "source": str(Path(source).resolve()),
        "source_sha256": published.sha256,
        "mapping": mapping.name,
        "backbone_layout": backbone_layout(module.net.backbone),
        "source_version": {k: str(v) for k, v in published.meta.items() if k.endswith("_version")},
        "classes": list(class_names),
    }
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        MODEL_CONFIG_KEY: module.model_config,
        INFERENCE_KEY: module.inference_config,
        CONVERSION_KEY: record,
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(checkpoint, output)
    log.info("converted %s (sha256 %s…) with %s into %s", published.path, published.sha256[:12], mapping.name, output)
    return record
