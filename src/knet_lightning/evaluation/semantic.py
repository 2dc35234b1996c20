"""Mean IoU from a confusion matrix, with mmseg's conventions.

mmseg (``mmseg.core.evaluation.metrics``): pixels whose GT is ``ignore_index`` are
dropped; per class IoU = intersect / union, NaN when the union is 0; mIoU is the
NaN-mean; pixel accuracy ("aAcc") is total intersect / total labelled pixels.
Predictions outside ``[0, num_classes)`` (e.g. the 255 of a void panoptic pixel) are
kept as wrong predictions: they count in the GT class's area but in no class's
predicted area, as mmseg's ``histc`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from knet_lightning.constants import IGNORE_INDEX

__all__ = ["MeanIoU"]


class MeanIoU(Metric):
    """Semantic segmentation mIoU and pixel accuracy, in percent.

    State: ``confmat`` int64 ``(num_classes, num_classes + 1)``, rows = GT class, columns =
    predicted class, the last column collecting out-of-range predictions. Summed across
    processes.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    confmat: Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes <= 0:
            raise ValueError(f"MeanIoU: num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"MeanIoU: class_names has {len(class_names)} entries, expected {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"MeanIoU: ignore_index {ignore_index} collides with a class id in [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.add_state("confmat", torch.zeros(num_classes, num_classes + 1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor | Sequence[Tensor], target: Tensor | Sequence[Tensor]) -> None:
        """Accumulate predicted class maps against GT maps.

        Args:
            preds: ``(H, W)`` or ``(B, H, W)`` integer class ids, or a list of ``(H, W)`` maps.
            target: same shape(s); ``ignore_index`` marks unlabelled pixels.
        """
        if isinstance(preds, Tensor) and isinstance(target, Tensor):
            self._update_one(preds, target)
            return
        if len(preds) != len(target):
            raise ValueError(f"MeanIoU.update: got {len(preds)} predictions and {len(target)} targets")
        for p, t in zip(preds, target):
            self._update_one(p, t)

    def _update_one(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(
                f"MeanIoU.update: preds and target must have the same shape, got {tuple(preds.shape)} "
                f"and {tuple(target.shape)}"
            )
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError("MeanIoU.update: preds and target must be integer class maps (take the argmax first)")
        c = self.num_classes
        target = target.to(self.confmat.device, torch.long).flatten()
        preds = preds.to(self.confmat.device, torch.long).flatten()
        valid = target != self.ignore_index
        target, preds = target[valid], preds[valid]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
            bad = target[(target < 0) | (target >= c)][0]
            raise ValueError(
                f"MeanIoU.update: target contains class {int(bad)}, expected [0, {c}) or ignore_index={self.ignore_index}"
            )
        preds = torch.where((preds >= 0) & (preds < c), preds, torch.full_like(preds, c))
        self.confmat += torch.bincount(target * (c + 1) + preds, minlength=c * (c + 1)).view(c, c + 1)

    def compute(self) -> dict[str, Tensor]:
        """``miou`` (NaN-mean of the per-class IoU), ``acc`` (pixel accuracy) and
        ``per_class_iou`` ``(num_classes,)`` (NaN where a class is in neither GT nor
        prediction), all in percent."""
        conf = self.confmat.double()
        c = self.num_classes
        intersect = conf[:, :c].diagonal()
        area_label = conf.sum(1)
        area_pred = conf[:, :c].sum(0)
        union = area_label + area_pred - intersect
        iou = torch.where(union > 0, intersect / union.clamp(min=1), torch.nan)
        total = area_label.sum()
        acc = intersect.sum() / total if bool(total > 0) else conf.new_tensor(float("nan"))
        return {
            "miou": (iou.nanmean() * 100).float(),
            "acc": (acc * 100).float(),
            "per_class_iou": (iou * 100).float(),
        }
