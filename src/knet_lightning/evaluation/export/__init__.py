"""Streaming writers of predictions in the official formats.

Each writer writes its files as images arrive; what stays in memory is small per image
(segment lists), never a full-resolution mask:

- :class:`COCOPanopticWriter` (``panoptic.py``): COCO panoptic PNGs (RGB-encoded ids) + ``panoptic.json``, the
  format ``panopticapi.evaluation.pq_compute`` reads (also Cityscapes' panoptic evaluation,
  which uses the same format).
- :class:`COCOResultsWriter` (``instance.py``): a COCO results JSON list (RLE masks), for ``COCO.loadRes`` /
  ``COCOeval(iouType="segm")``; entries are written to disk one by one.
- :class:`SemanticPNGWriter` (``semantic.py``): single-channel PNGs of class ids, optionally mapped to the
  data set's ids (e.g. Cityscapes labelIds for ``cityscapesscripts``' evaluation).

Which writer a run uses is its task's choice (:meth:`knet_lightning.tasks.SegmentationTask.open_writer`).

A repeated ``image_id`` is written once: ``DistributedSampler`` pads the last batch by
repeating samples, and a second copy would count twice in the official evaluations.
What the writers share is in ``writer.py``.
"""

from knet_lightning.evaluation.export.instance import COCOResultsWriter
from knet_lightning.evaluation.export.panoptic import COCOPanopticWriter, segment_areas_and_boxes
from knet_lightning.evaluation.export.semantic import SemanticPNGWriter
from knet_lightning.evaluation.export.writer import json_image_id

__all__ = [
    "COCOPanopticWriter",
    "COCOResultsWriter",
    "SemanticPNGWriter",
    "json_image_id",
    "segment_areas_and_boxes",
]
