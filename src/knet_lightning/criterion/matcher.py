"""One-to-one Hungarian matching of kernels to ground-truth masks (paper §3.3, bipartite matching).

Mirrors the official ``MaskHungarianAssigner`` (``knet/det/mask_hungarian_assigner.py``) with
``FocalLossCost`` (weight 2), ``DiceCost`` (weight 4) and ``MaskCost`` (weight 1). The cost
matrices of the whole batch are built with batched matmuls over flattened pixels (ground truths
padded to the batch maximum), never as an ``N x G x H x W`` broadcast; only the assignment
itself runs per image, in scipy on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """Match predicted masks (and optionally class scores) to GT masks per image.

    Cost between prediction ``n`` and ground truth ``g`` (``p = sigmoid``):

    * class: ``cls_weight * [alpha (1-p)^gamma (-log(p+eps)) - (1-alpha) p^gamma (-log(1-p+eps))]``
      at the GT's class (only when class logits are given);
    * dice: ``-dice_weight * 2 sum(p t) / (sum p^2 + 1e-3 + sum t^2 + 1e-3)``;
    * mask: ``-mask_weight * [sum(p t) + sum((1-p)(1-t))] / (H W)`` (soft pixel accuracy).

    Args:
        cls_weight: weight of the focal class cost.
        dice_weight: weight of the dice cost.
        mask_weight: weight of the linear mask cost.
        alpha: focal cost alpha.
        gamma: focal cost gamma.
        eps: focal cost log epsilon.
        dice_eps: added to each squared sum in the dice denominator.
    """

    def __init__(
        self,
        cls_weight: float = 2.0,
        dice_weight: float = 4.0,
        mask_weight: float = 1.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        eps: float = 1e-12,
        dice_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.cls_weight = cls_weight
        self.dice_weight = dice_weight
        self.mask_weight = mask_weight
        self.alpha = alpha
        self.gamma = gamma
        self.eps = eps
        self.dice_eps = dice_eps

    @torch.no_grad()
    def cost_matrices(
        self,
        mask_logits: Tensor,
        cls_logits: Tensor | None,
        gt_masks: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
    ) -> list[Tensor]:
        """Total matching cost per image.

        Args:
            mask_logits: ``(B, N, h, w)`` mask logits.
            cls_logits: ``(B, N, C)`` sigmoid class logits, or ``None`` for no class cost.
            gt_masks: ``B`` tensors ``(G_b, h, w)`` of soft GT masks in ``[0, 1]``.
            gt_labels: ``B`` int64 tensors ``(G_b,)`` of class ids in ``[0, C)``.

        Returns:
            ``B`` float32 tensors ``(N, G_b)`` on ``mask_logits.device``.
        """
        self._check_inputs(mask_logits, cls_logits, gt_masks, gt_labels)
        B, N, h, w = mask_logits.shape
        counts = [int(m.shape[0]) for m in gt_masks]
        g_max = max(counts, default=0)
        device = mask_logits.device
        if g_max == 0:
            return [mask_logits.new_zeros((N, 0), dtype=torch.float32) for _ in range(B)]

        # GTs padded to the batch maximum so that every cost term is one batched matmul.
        t = mask_logits.new_zeros((B, g_max, h * w), dtype=torch.float32)
        labels = torch.zeros((B, g_max), dtype=torch.long, device=device)
        for b, (m, lab) in enumerate(zip(gt_masks, gt_labels)):
            t[b, : counts[b]] = m.to(device=device, dtype=torch.float32).flatten(1)
            labels[b, : counts[b]] = lab.to(device)

        p = mask_logits.float().sigmoid().flatten(2)  # (B, N, HW)
        pt = torch.bmm(p, t.transpose(1, 2))  # (B, N, G)
        sum_p = p.sum(-1)  # (B, N)
        sum_t = t.sum(-1)  # (B, G)

        cost = torch.zeros_like(pt)
        if self.dice_weight != 0:
            denom = (p * p).sum(-1)[:, :, None] + self.dice_eps + (t * t).sum(-1)[:, None, :] + self.dice_eps
            cost = cost - self.dice_weight * (2 * pt / denom)
        if self.mask_weight != 0:
            # sum (1-p)(1-t) = HW - sum p - sum t + sum p t: saves a second matmul.
            hw = float(h * w)
            neg = hw - sum_p[:, :, None] - sum_t[:, None, :] + pt
            cost = cost - self.mask_weight * (pt + neg) / hw
        if cls_logits is not None and self.cls_weight != 0:
            prob = cls_logits.float().sigmoid()
            neg_cost = -(1 - prob + self.eps).log() * (1 - self.alpha) * prob.pow(self.gamma)
            pos_cost = -(prob + self.eps).log() * self.alpha * (1 - prob).pow(self.gamma)
            cls_cost = (pos_cost - neg_cost).gather(2, labels[:, None, :].expand(B, N, g_max))
            cost = cost + self.cls_weight * cls_cost
        return [cost[b, :, : counts[b]] for b in range(B)]

    @torch.no_grad()
    def forward(
        self,
        mask_logits: Tensor,
        cls_logits: Tensor | None,
        gt_masks: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
    ) -> list[tuple[Tensor, Tensor]]:
        """Hungarian assignment per image.

        Args: as :meth:`cost_matrices`.

        Returns:
            ``B`` pairs ``(pred_idx, gt_idx)`` of int64 tensors of equal length
            ``min(N, G_b)``, sorted by ``pred_idx``, on ``mask_logits.device``. Kernels not in
            ``pred_idx`` are background; if ``N < G_b`` some GTs stay unmatched.
        """
        device = mask_logits.device
        out: list[tuple[Tensor, Tensor]] = []
        for b, cost in enumerate(self.cost_matrices(mask_logits, cls_logits, gt_masks, gt_labels)):
            if cost.numel() == 0:
                empty = torch.zeros(0, dtype=torch.long, device=device)
                out.append((empty, empty.clone()))
                continue
            c = cost.cpu().numpy()
            if not np.isfinite(c).all():
                raise ValueError(
                    f"HungarianMatcher: the cost matrix of image {b} has NaN/inf entries; "
                    "the mask or class logits are not finite"
                )
            rows, cols = linear_sum_assignment(c)
            order = np.argsort(rows)
            out.append(
                (
                    torch.as_tensor(rows[order], dtype=torch.long, device=device),
                    torch.as_tensor(cols[order], dtype=torch.long, device=device),
                )
            )
        return out

    @staticmethod
    def _check_inputs(
        mask_logits: Tensor,
        cls_logits: Tensor | None,
        gt_masks: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
    ) -> None:
        if mask_logits.dim() != 4:
            raise ValueError(f"HungarianMatcher: mask_logits must be (B, N, h, w), got {tuple(mask_logits.shape)}")
        B, N, h, w = mask_logits.shape
        if len(gt_masks) != B or len(gt_labels) != B:
            raise ValueError(
                f"HungarianMatcher: got {len(gt_masks)} gt_masks and {len(gt_labels)} gt_labels for a batch of {B}"
            )
        if cls_logits is not None and (cls_logits.dim() != 3 or cls_logits.shape[:2] != (B, N)):
            raise ValueError(f"HungarianMatcher: cls_logits must be (B={B}, N={N}, C), got {tuple(cls_logits.shape)}")
        for b, (m, lab) in enumerate(zip(gt_masks, gt_labels)):
            if m.dim() != 3 or m.shape[1:] != (h, w):
                raise ValueError(
                    f"HungarianMatcher: gt_masks[{b}] must be (G, {h}, {w}) like mask_logits, got {tuple(m.shape)}"
                )
            if lab.dim() != 1 or lab.shape[0] != m.shape[0]:
                raise ValueError(f"HungarianMatcher: gt_labels[{b}] must be ({m.shape[0]},), got {tuple(lab.shape)}")
            if cls_logits is not None and lab.numel() > 0:
                lo, hi = int(lab.min()), int(lab.max())
                if lo < 0 or hi >= cls_logits.shape[-1]:
                    raise ValueError(
                        f"HungarianMatcher: gt_labels[{b}] must lie in [0, {cls_logits.shape[-1]}), "
                        f"got values in [{lo}, {hi}]"
                    )
