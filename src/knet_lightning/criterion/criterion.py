"""K-Net training criterion for the instance and panoptic tasks (paper §3.3; the official
``KernelIterHead.forward_train`` in ``knet/det/kernel_iter_head.py`` and the ``loss()`` of
``knet/det/kernel_head.py`` / ``knet/det/kernel_update_head.py``).

Per stage, following the official code:

* **Stage 0** (kernel head) is matched on its own detached stride-4 masks ``M0`` without a
  class cost. Losses on the ``num_proposals`` instance kernels only: mask BCE, dice, the dense
  auxiliary sigmoid-focal semantic loss on ``sem_logits`` and (panoptic) the rank loss.
* **Update stage s >= 1** is matched on stage ``s-1``'s detached predictions: stage 1 on
  ``M0`` with dice + mask costs only (so it reuses stage 0's assignment), stages >= 2 on the
  previous stage's masks *and* class scores. Losses: focal class loss, mask BCE, dice and
  (panoptic) rank over all ``num_proposals + num_stuff`` kernels.
* Only thing GTs and the first ``num_proposals`` kernels take part in matching. Stuff kernel
  ``num_proposals + k`` is hard-wired to stuff class ``num_things + k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.criterion.losses import (
    dice_loss,
    mask_bce_loss,
    rank_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_dense,
)
from knet_lightning.criterion.matcher import HungarianMatcher
from knet_lightning.criterion.targets import Targets, last_cover, prepare_targets
from knet_lightning.models.outputs import StageOutput

__all__ = ["KNetCriterion"]

Assignment = list[tuple[Tensor, Tensor]]


def _reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over processes when torch.distributed runs, else ``x``."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x.div_(dist.get_world_size()))
    return x


class KNetCriterion(nn.Module):
    """Matching + weighted K-Net losses for all stages.

    Args:
        num_things: number of thing classes (ids ``[0, num_things)``).
        num_stuff: number of stuff classes (ids ``[num_things, num_things + num_stuff)``).
        num_proposals: number of instance kernels (the first rows of every stage's outputs);
            ``None`` (what the configs use) reads it off the network's outputs, and a number is
            checked against them.
        matcher: the Hungarian matcher; default ``HungarianMatcher()`` (cls 2, dice 4, mask 1).
        cls_weight: focal class loss weight (update stages).
        mask_weight: mask BCE weight.
        dice_weight: dice loss weight.
        rank_weight: rank loss weight (panoptic only).
        seg_weight: stage-0 auxiliary dense focal loss weight.
        stage_weights: one weight per *update* stage ``1..S`` (default all 1); stage 0 is
            unweighted, as in the official code.
        alpha: focal alpha (class and dense losses).
        gamma: focal gamma.
        stuff_kernels: the network has one stuff kernel per stuff class after its instance
            kernels, learned with the rank loss (panoptic, paper §3.2); ``False``: it has none,
            and the stuff segments of the targets are ignored (instance; the official
            instance configs have no stuff classes and no ``loss_rank``).
    """

    def __init__(
        self,
        num_things: int,
        num_stuff: int,
        num_proposals: int | None = None,
        matcher: HungarianMatcher | None = None,
        cls_weight: float = 2.0,
        mask_weight: float = 1.0,
        dice_weight: float = 4.0,
        rank_weight: float = 0.1,
        seg_weight: float = 1.0,
        stage_weights: Sequence[float] | None = None,
        alpha: float = 0.25,
        gamma: float = 2.0,
        stuff_kernels: bool = True,
    ) -> None:
        super().__init__()
        if num_things < 1:
            raise ValueError(f"KNetCriterion: num_things must be >= 1, got {num_things}")
        if num_stuff < 0 or (stuff_kernels and num_stuff < 1):
            raise ValueError(
                "KNetCriterion: num_stuff must be >= 1 with stuff kernels (panoptic) and >= 0 otherwise, "
                f"got {num_stuff}"
            )
        if num_proposals is not None and num_proposals < 1:
            raise ValueError(f"KNetCriterion: num_proposals must be >= 1, got {num_proposals}")
        self.stuff_kernels = bool(stuff_kernels)
        self.num_things = num_things
        self.num_stuff = num_stuff
        self.num_proposals = num_proposals
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.cls_weight = cls_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.rank_weight = rank_weight
        self.seg_weight = seg_weight
        self.stage_weights = None if stage_weights is None else [float(w) for w in stage_weights]
        self.alpha = alpha
        self.gamma = gamma

    @property
    def num_classes(self) -> int:
        """Width of the class logits: things + stuff for panoptic, things for instance."""
        return self.num_things + (self.num_stuff if self.stuff_kernels else 0)

    @property
    def num_stuff_kernels(self) -> int:
        """Stuff kernels after the instance kernels: one per stuff class for panoptic."""
        return self.num_stuff if self.stuff_kernels else 0

    def instance_kernels(self, out: StageOutput) -> int:
        """The number of instance kernels P of a stage output: the network's ``num_proposals``
        (its kernels less the stuff kernels), the one source of that number."""
        return out.mask_logits.shape[1] - self.num_stuff_kernels

    # ------------------------------------------------------------------ forward

    def forward(self, outputs: Sequence[StageOutput], targets: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        """Weighted loss terms of every stage.

        Args:
            outputs: ``S + 1`` stage outputs (stage 0 = kernel head); see
                :class:`~knet_lightning.models.outputs.StageOutput`.
            targets: ``B`` target dicts of the batch contract (``masks`` bool ``(K, h, w)``,
                ``labels`` int64 ``(K,)``, ``iscrowd`` bool ``(K,)``).

        Returns:
            ``{"s0.mask", "s0.dice", "s0.seg", ["s0.rank"], "s1.cls", "s1.mask", "s1.dice",
            ["s1.rank"], ...}``: scalar tensors, already multiplied by their loss and stage
            weights; the caller sums them. Rank terms only for panoptic.
        """
        self._check_outputs(outputs, targets)
        num_stages = len(outputs) - 1
        stage_weights = self.stage_weights if self.stage_weights is not None else [1.0] * num_stages
        if len(stage_weights) != num_stages:
            raise ValueError(
                f"KNetCriterion: stage_weights has {len(stage_weights)} entries but the model has "
                f"{num_stages} update stages"
            )
        P = self.instance_kernels(outputs[0])
        mask0 = outputs[0].mask_logits
        gts = self._prepare_targets(targets, tuple(mask0.shape[-2:]), mask0.device)

        losses: dict[str, Tensor] = {}
        # Stage 0 and stage 1 are both matched on M0 without a class cost: one assignment.
        assignment = self.matcher(mask0[:, :P].detach(), None, gts.thing_masks, gts.thing_labels)
        losses.update(self._stage0_losses(outputs[0], assignment, gts))
        for s in range(1, num_stages + 1):
            if s >= 2:
                prev = outputs[s - 1]
                assignment = self.matcher(
                    prev.mask_logits[:, :P].detach(),
                    prev.cls_logits[:, :P, : self.num_things].detach(),
                    gts.thing_masks,
                    gts.thing_labels,
                )
            losses.update(self._update_stage_losses(s, outputs[s], assignment, gts, stage_weights[s - 1]))
        return losses

    # ------------------------------------------------------------------ targets

    def _prepare_targets(
        self, targets: Sequence[dict[str, Any]], size: tuple[int, int], device: torch.device
    ) -> Targets:
        """The batch's ground truth at stride 4 (:func:`~knet_lightning.criterion.targets.prepare_targets`)."""
        return prepare_targets(
            targets,
            size,
            device,
            num_things=self.num_things,
            num_stuff=self.num_stuff,
            stuff_kernels=self.stuff_kernels,
        )

    def _thing_targets(
        self, assignment: Assignment, gts: Targets, batch: int, num_rows: int, size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Per-kernel labels and mask targets from the matching.

        Returns:
            ``labels (B, num_rows)`` int64 (``num_classes`` = background) and
            ``mask_targets (B, num_rows, h, w)`` float (zero for unmatched kernels).
        """
        device = gts.stuff_masks.device
        labels = torch.full((batch, num_rows), self.num_classes, dtype=torch.long, device=device)
        mask_targets = torch.zeros((batch, num_rows, *size), device=device)
        offsets = [0]
        for m in gts.thing_masks:
            offsets.append(offsets[-1] + int(m.shape[0]))
        pred_flat = torch.cat([b * num_rows + p for b, (p, _) in enumerate(assignment)])
        gt_flat = torch.cat([offsets[b] + g for b, (_, g) in enumerate(assignment)])
        if pred_flat.numel() > 0:
            labels.view(-1)[pred_flat] = torch.cat(gts.thing_labels)[gt_flat]
            mask_targets.view(-1, *size)[pred_flat] = torch.cat(gts.thing_masks)[gt_flat]
        return labels, mask_targets

    def _rank_target(self, mask_targets: Tensor, pos: Tensor) -> Tensor:
        """``(B, h, w)`` index of the last positive kernel whose binarized target covers the pixel."""
        owner = last_cover(mask_targets, pos)
        return torch.where(owner >= 0, owner, torch.full_like(owner, IGNORE_INDEX))

    # ------------------------------------------------------------------ losses

    def _mask_losses(
        self, mask_logits: Tensor, mask_targets: Tensor, pos: Tensor, prefix: str, weight: float
    ) -> dict[str, Tensor]:
        """Mask BCE, dice and (panoptic) rank on the positive kernels."""
        out: dict[str, Tensor] = {}
        if pos.any():
            pos_logits, pos_targets = mask_logits[pos], mask_targets[pos]
            out[f"{prefix}.mask"] = weight * self.mask_weight * mask_bce_loss(pos_logits, pos_targets)
            out[f"{prefix}.dice"] = weight * self.dice_weight * dice_loss(pos_logits, pos_targets)
            if self.stuff_kernels:
                rank = rank_loss(mask_logits, self._rank_target(mask_targets, pos), IGNORE_INDEX)
                out[f"{prefix}.rank"] = weight * self.rank_weight * rank
        else:
            zero = mask_logits.sum() * 0.0
            out[f"{prefix}.mask"] = zero
            out[f"{prefix}.dice"] = zero.clone()
            if self.stuff_kernels:
                out[f"{prefix}.rank"] = zero.clone()
        return out

    def _stage0_losses(self, out: StageOutput, assignment: Assignment, gts: Targets) -> dict[str, Tensor]:
        """Kernel-head losses on the ``num_proposals`` instance kernels + dense focal loss."""
        mask_logits = out.mask_logits[:, : self.instance_kernels(out)]
        B, P, h, w = mask_logits.shape
        labels, mask_targets = self._thing_targets(assignment, gts, B, P, (h, w))
        pos = labels < self.num_classes
        losses = self._mask_losses(mask_logits, mask_targets, pos, "s0", 1.0)

        # Dense target: stuff pixels first, then matched things overwrite in kernel order.
        C = self.num_classes
        seg_target = torch.full((B, h, w), C, dtype=torch.long, device=mask_logits.device)
        if self.stuff_kernels:
            stuff_owner = last_cover(gts.stuff_masks, gts.stuff_present)
            seg_target = torch.where(stuff_owner >= 0, stuff_owner + self.num_things, seg_target)
        thing_owner = last_cover(mask_targets, pos)
        thing_cls = labels.gather(1, thing_owner.clamp(min=0).flatten(1)).view(B, h, w)
        seg_target = torch.where(thing_owner >= 0, thing_cls, seg_target)

        sem_logits = F.interpolate(out.sem_logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        num_fg = (seg_target < C).sum().float().clamp(min=1.0)
        seg = sigmoid_focal_loss_dense(sem_logits, seg_target, alpha=self.alpha, gamma=self.gamma, avg_factor=num_fg)
        losses["s0.seg"] = self.seg_weight * seg
        return losses

    def _update_stage_losses(
        self, s: int, out: StageOutput, assignment: Assignment, gts: Targets, stage_weight: float
    ) -> dict[str, Tensor]:
        """Class, mask, dice and (panoptic) rank losses of update stage ``s`` over all kernels."""
        mask_logits, cls_logits = out.mask_logits, out.cls_logits
        B, N, h, w = mask_logits.shape
        P, T, C = self.instance_kernels(out), self.num_things, self.num_classes
        labels, mask_targets = self._thing_targets(assignment, gts, B, N, (h, w))
        label_weights = mask_logits.new_zeros((B, N, C), dtype=torch.float32)
        # Thing kernels never see a gradient on stuff columns (zero weight there).
        label_weights[:, :P, :T] = 1.0
        if self.stuff_kernels:
            S = self.num_stuff
            stuff_cls = torch.arange(S, device=mask_logits.device) + T
            labels[:, P:] = torch.where(gts.stuff_present, stuff_cls, torch.full_like(stuff_cls, C))
            # Stuff kernel k learns only a present/absent logit in its own column T + k.
            label_weights[:, P:, T:] = torch.eye(S, device=mask_logits.device)
            mask_targets[:, P:] = gts.stuff_masks
        pos = labels < C
        avg_factor = _reduce_mean(pos.sum().float()).clamp(min=1.0)
        onehot = F.one_hot(labels, C + 1)[..., :C]
        cls = sigmoid_focal_loss(cls_logits, onehot, label_weights, self.alpha, self.gamma, avg_factor)
        losses = {f"s{s}.cls": stage_weight * self.cls_weight * cls}
        losses.update(self._mask_losses(mask_logits, mask_targets, pos, f"s{s}", stage_weight))
        return losses

    # ------------------------------------------------------------------ checks

    def _check_outputs(self, outputs: Sequence[StageOutput], targets: Sequence[dict[str, Any]]) -> None:
        if len(outputs) < 1:
            raise ValueError("KNetCriterion: outputs must hold at least the stage-0 output")
        B = outputs[0].mask_logits.shape[0]
        if len(targets) != B:
            raise ValueError(f"KNetCriterion: got {len(targets)} targets for a batch of {B} images")
        size = tuple(outputs[0].mask_logits.shape[-2:])
        if self.num_proposals is not None:
            n_expected = self.num_proposals + self.num_stuff_kernels
        else:  # whatever the network has, as long as every stage agrees and P >= 1
            n_expected = max(outputs[0].mask_logits.shape[1], self.num_stuff_kernels + 1)
        for s, out in enumerate(outputs):
            m = out.mask_logits
            if m.dim() != 4 or m.shape[0] != B or m.shape[1] != n_expected or tuple(m.shape[-2:]) != size:
                raise ValueError(
                    f"KNetCriterion: outputs[{s}].mask_logits must be (B={B}, N={n_expected}, {size[0]}, "
                    f"{size[1]}) (num_proposals + num_stuff kernels for panoptic), got {tuple(m.shape)}"
                )
            if s == 0:
                sem = out.sem_logits
                if sem is None or sem.dim() != 4 or sem.shape[:2] != (B, self.num_classes):
                    got = None if sem is None else tuple(sem.shape)
                    raise ValueError(
                        f"KNetCriterion: outputs[0].sem_logits must be (B={B}, C={self.num_classes}, h, w) "
                        f"auxiliary semantic logits, got {got}"
                    )
            else:
                c = out.cls_logits
                if c is None or c.shape != (B, n_expected, self.num_classes):
                    got = None if c is None else tuple(c.shape)
                    raise ValueError(
                        f"KNetCriterion: outputs[{s}].cls_logits must be (B={B}, N={n_expected}, "
                        f"C={self.num_classes}), got {got}"
                    )
