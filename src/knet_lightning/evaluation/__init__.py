"""Metrics (PQ, mIoU, mask AP) and exporters to official formats."""

from knet_lightning.evaluation.panoptic import PanopticQuality, target_to_panoptic_gt
from knet_lightning.evaluation.semantic import MeanIoU

__all__ = ["MeanIoU", "PanopticQuality", "target_to_panoptic_gt"]
