"""Metrics and writers of the official formats.

Owns: panoptic quality (``panoptic.py``), mean IoU (``semantic.py``), COCO mask AP and the RLE
encoding of masks (``instance.py``), and the streaming writers of predictions in the formats of
the official evaluations (``export/``: COCO panoptic PNG + JSON, COCO results JSON, semantic
PNGs). They work on plain tensors and arrays: which metric and writer a run uses is its task's
choice (:mod:`knet_lightning.tasks`).

Imports: layer 5 of the package (see :mod:`knet_lightning`), beside criterion and postprocess,
so only layers 1 to 4. Today that is :mod:`knet_lightning.constants` (``IGNORE_INDEX``) and, in
``export/``, :mod:`knet_lightning.data.io` (``id2rgb``) and :mod:`knet_lightning.data.meta`
(``ClassInfo``); nothing from criterion, postprocess (its own layer), tasks or above.
"""

from knet_lightning.evaluation.panoptic import PanopticQuality
from knet_lightning.evaluation.semantic import MeanIoU

__all__ = ["MeanIoU", "PanopticQuality"]
