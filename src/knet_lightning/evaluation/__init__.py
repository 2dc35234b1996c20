"""Metrics (PQ, mIoU, mask AP) and exporters to official formats."""

from knet_lightning.evaluation.panoptic import PanopticQuality
from knet_lightning.evaluation.semantic import MeanIoU

__all__ = ["MeanIoU", "PanopticQuality"]
