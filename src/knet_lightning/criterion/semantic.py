"""Semantic-task criterion: per-stage softmax CE, plus the auxiliary FCN head.

Paper §3.4 (semantic segmentation); the official ``IterativeDecodeHead.losses`` in
``knet/seg/iter_decode_head.py``. No matching and no classification branch: kernel ``n`` is
class ``n`` and every stage's mask logits are segmentation logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knet_lightning.criterion.losses import semantic_ce_loss
from knet_lightning.models.outputs import StageOutput

__all__ = ["SemanticCriterion"]


class SemanticCriterion(nn.Module):
    """Softmax CE on every stage's logits (resized to the label size) + 0.4 aux CE.

    Args:
        num_classes: number of classes (logit channels).
        ignore_index: void label in ``sem_seg`` and the padding value.
        stage_weights: one weight per *update* stage ``1..S`` (default all 1); stage 0 (the
            decode head) has weight 1, as in the official code.
        aux_weight: weight of the auxiliary FCN head's CE (``outputs[0].sem_logits``).
        avg_non_ignore: ``False`` (mmseg 0.x, the official setting) averages the CE over all
            label pixels, void and padding included; ``True`` over valid pixels only.
        size_divisor: what the collate function pads images to a multiple of
            (``data.size_divisor``); the labels are padded the same way.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        stage_weights: Sequence[float] | None = None,
        aux_weight: float = 0.4,
        avg_non_ignore: bool = False,
        size_divisor: int = 32,
    ) -> None:
        super().__init__()
        if int(size_divisor) < 1:
            raise ValueError(f"SemanticCriterion: size_divisor must be >= 1, got {size_divisor}")
        self.size_divisor = int(size_divisor)
        if num_classes < 2:
            # the assembling is a softmax over the class masks (paper Eq. 9 on semantic masks)
            raise ValueError(f"SemanticCriterion: num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.stage_weights = None if stage_weights is None else [float(w) for w in stage_weights]
        self.aux_weight = aux_weight
        self.avg_non_ignore = avg_non_ignore

    def forward(
        self,
        outputs: Sequence[StageOutput],
        targets: Sequence[dict[str, Any]],
        pad_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """Weighted CE terms.

        Args:
            outputs: ``S + 1`` stage outputs; ``mask_logits`` ``(B, num_classes, h, w)`` at any
                stride; ``outputs[0].sem_logits`` the aux head logits or ``None`` (no aux term).
            targets: ``B`` dicts with ``sem_seg`` int64 ``(h_b, w_b)`` (255 = void).
            pad_size: ``(Hp, Wp)`` of the padded image batch; the labels are padded with
                ``ignore_index`` to it. Default: the largest label size rounded up to a multiple
                of ``size_divisor``, which is what the collate function pads images to.

        Returns:
            ``{"s0.ce", "s1.ce", ..., "aux.ce"}``: weighted scalar losses.
        """
        if len(outputs) < 1:
            raise ValueError("SemanticCriterion: outputs must hold at least the stage-0 output")
        num_stages = len(outputs) - 1
        stage_weights = self.stage_weights if self.stage_weights is not None else [1.0] * num_stages
        if len(stage_weights) != num_stages:
            raise ValueError(
                f"SemanticCriterion: stage_weights has {len(stage_weights)} entries but the model has "
                f"{num_stages} update stages"
            )
        B = outputs[0].mask_logits.shape[0]
        label = self._labels(targets, B, pad_size, outputs[0].mask_logits.device)

        losses: dict[str, Tensor] = {}
        for s, out in enumerate(outputs):
            weight = 1.0 if s == 0 else stage_weights[s - 1]
            losses[f"s{s}.ce"] = weight * self._ce(out.mask_logits, label, f"outputs[{s}].mask_logits")
        aux = outputs[0].sem_logits
        if aux is not None and self.aux_weight != 0:
            losses["aux.ce"] = self.aux_weight * self._ce(aux, label, "outputs[0].sem_logits")
        return losses

    def _ce(self, logits: Tensor, label: Tensor, name: str) -> Tensor:
        """CE of ``(B, C, h, w)`` logits bilinearly resized to the ``(B, Hp, Wp)`` label."""
        if logits.dim() != 4 or logits.shape[:2] != (label.shape[0], self.num_classes):
            raise ValueError(
                f"SemanticCriterion: {name} must be (B={label.shape[0]}, C={self.num_classes}, h, w), "
                f"got {tuple(logits.shape)}"
            )
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        return semantic_ce_loss(logits, label, self.ignore_index, self.avg_non_ignore)

    def _labels(
        self,
        targets: Sequence[dict[str, Any]],
        batch: int,
        pad_size: tuple[int, int] | None,
        device: torch.device,
    ) -> Tensor:
        """Stack ``sem_seg`` maps into ``(B, Hp, Wp)`` int64, padded bottom/right with void."""
        if len(targets) != batch:
            raise ValueError(f"SemanticCriterion: got {len(targets)} targets for a batch of {batch} images")
        segs = []
        for b, tgt in enumerate(targets):
            if "sem_seg" not in tgt:
                raise KeyError(f"SemanticCriterion: targets[{b}] has no 'sem_seg' entry")
            seg = torch.as_tensor(tgt["sem_seg"], device=device).as_subclass(Tensor)
            if seg.dim() == 3 and seg.shape[0] == 1:
                seg = seg[0]
            if seg.dim() != 2 or seg.is_floating_point():
                raise ValueError(
                    f"SemanticCriterion: targets[{b}]['sem_seg'] must be an int64 (h, w) map, "
                    f"got {seg.dtype} {tuple(seg.shape)}"
                )
            seg = seg.long()
            bad = (seg != self.ignore_index) & ((seg < 0) | (seg >= self.num_classes))
            if bad.any():
                raise ValueError(
                    f"SemanticCriterion: targets[{b}]['sem_seg'] has values outside [0, {self.num_classes}) "
                    f"and != {self.ignore_index}: {torch.unique(seg[bad])[:10].tolist()}"
                )
            segs.append(seg)
        if pad_size is None:
            d = self.size_divisor
            pad_size = (
                d * math.ceil(max(s.shape[0] for s in segs) / d),
                d * math.ceil(max(s.shape[1] for s in segs) / d),
            )
        hp, wp = pad_size
        label = torch.full((batch, hp, wp), self.ignore_index, dtype=torch.long, device=device)
        for b, seg in enumerate(segs):
            h, w = seg.shape
            if h > hp or w > wp:
                raise ValueError(
                    f"SemanticCriterion: targets[{b}]['sem_seg'] is {h}x{w}, larger than pad_size {hp}x{wp}"
                )
            label[b, :h, :w] = seg
        return label
