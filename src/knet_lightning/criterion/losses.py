"""K-Net loss functions (paper §3.3; the ``loss()`` of the official ``knet/det/kernel_head.py``
and ``knet/det/kernel_update_head.py``), as pure functions.

Every function returns an *unweighted* scalar; the criteria multiply by the loss weights.
They follow the reductions of the official MMDetection 2.x / MMSegmentation 0.x code, which
are not always the "obvious" ones (see ``rank_loss`` and ``semantic_ce_loss``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_dense",
    "dice_loss",
    "mask_bce_loss",
    "rank_loss",
    "semantic_ce_loss",
]


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    avg_factor: Tensor | float | None = None,
) -> Tensor:
    """Sigmoid focal loss (Lin et al.), as mmdet's ``py_sigmoid_focal_loss``.

    ``loss = BCE(x, t) * (alpha t + (1 - alpha)(1 - t)) * pt^gamma`` with
    ``pt = (1 - p) t + p (1 - t)`` and ``p = sigmoid(x)``.

    Args:
        logits: ``(..., C)`` (any shape) raw logits.
        targets: same shape, one-hot (or soft) targets in ``[0, 1]``; an all-zero row is
            background, since there is no background logit.
        weight: optional per-element weights, same shape as ``logits`` (or broadcastable).
        alpha: weight of the positive term.
        gamma: focusing exponent.
        avg_factor: if given, the weighted *sum* is divided by it (mmdet's normaliser, e.g.
            the number of positives); otherwise the weighted mean over all elements.

    Returns:
        Scalar loss.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"sigmoid_focal_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
            "must have the same shape"
        )
    logits = logits.float()
    targets = targets.to(logits.dtype)
    p = logits.sigmoid()
    pt = (1 - p) * targets + p * (1 - targets)
    focal_weight = (alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * focal_weight
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    if avg_factor is None:
        return loss.mean()
    return loss.sum() / avg_factor


def sigmoid_focal_loss_dense(
    logits: Tensor,
    target: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    avg_factor: Tensor | float | None = None,
) -> Tensor:
    """:func:`sigmoid_focal_loss` of per-pixel class logits against a class-index map.

    The same value as ``sigmoid_focal_loss(logits, one_hot(target))`` without building the
    ``(B, C, H, W)`` one-hot: every element is first scored as a negative,
    ``(1 - alpha) p^gamma softplus(x)``, and the target class of each foreground pixel is
    then switched to its positive term, ``alpha (1 - p)^gamma softplus(-x)``. On a 133-class
    stride-4 map that is a few passes instead of a dozen.

    Args:
        logits: ``(B, C, H, W)`` raw logits.
        target: ``(B, H, W)`` int64 class ids; ids outside ``[0, C)`` (e.g. ``C``) are
            background (every class is a negative there).
        alpha, gamma, avg_factor: as :func:`sigmoid_focal_loss`.

    Returns:
        Scalar loss.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"sigmoid_focal_loss_dense: expected logits (B, C, H, W) and target (B, H, W); got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    logits = logits.float()
    num_classes = logits.shape[1]
    p = logits.sigmoid()
    negative = (1 - alpha) * p.pow(gamma) * F.softplus(logits)
    total = negative.sum()
    fg = (target >= 0) & (target < num_classes)
    if bool(fg.any()):
        x = logits.gather(1, target.clamp(0, num_classes - 1).unsqueeze(1)).squeeze(1)[fg]
        px = x.sigmoid()
        positive = alpha * (1 - px).pow(gamma) * F.softplus(-x)
        total = total + (positive - (1 - alpha) * px.pow(gamma) * F.softplus(x)).sum()
    if avg_factor is None:
        return total / logits.numel()
    return total / avg_factor


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1e-3) -> Tensor:
    """Dice loss with squared denominators, averaged over masks (knet ``DiceLoss``).

    ``1 - 2 sum(p t) / ((sum p^2 + eps) + (sum t^2 + eps))`` per mask, ``p = sigmoid(logits)``.

    Args:
        logits: ``(P, H, W)`` (or ``(P, ...)``) mask logits.
        targets: same shape, soft targets in ``[0, 1]``.
        eps: added to *each* squared sum, as the official code does.

    Returns:
        Scalar: mean over the ``P`` masks (``0 * sum`` of the logits when ``P == 0``, so the
        graph stays connected).
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"dice_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape"
        )
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    p = logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    a = (p * t).sum(1)
    b = (p * p).sum(1) + eps
    c = (t * t).sum(1) + eps
    return (1 - 2 * a / (b + c)).mean()


def mask_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits, mean over every pixel of every mask.

    Args:
        logits: ``(P, H, W)`` mask logits.
        targets: same shape, soft targets in ``[0, 1]``.

    Returns:
        Scalar (``0 * sum`` of the logits when ``P == 0``).
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"mask_bce_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape"
        )
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="mean")


def rank_loss(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Softmax cross-entropy across the kernel dimension at each pixel (panoptic rank loss).

    The mean runs over **all** pixels, ignored ones included (they contribute 0): this is the
    mmdet 2.17 ``CrossEntropyLoss`` reduction the official numbers were trained with.

    Args:
        logits: ``(B, N, H, W)`` mask logits of all kernels.
        target: ``(B, H, W)`` int64 index of the kernel that owns each pixel, or
            ``ignore_index``.
        ignore_index: label of pixels that take no loss.

    Returns:
        Scalar loss.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"rank_loss: expected logits (B, N, H, W) and target (B, H, W); got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    loss = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    return loss.mean()


def semantic_ce_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, avg_non_ignore: bool = False) -> Tensor:
    """Per-pixel softmax cross-entropy over classes, with an ignore label.

    Args:
        logits: ``(B, C, H, W)`` class logits (already at the label size).
        target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for void.
        ignore_index: void label.
        avg_non_ignore: ``False`` (mmseg 0.x default, the official K-Net setting) averages
            over all pixels, ignored ones included; ``True`` averages over valid pixels only
            (0 if there are none).

    Returns:
        Scalar loss.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"semantic_ce_loss: expected logits (B, C, H, W) and target (B, H, W); got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    loss = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    if not avg_non_ignore:
        return loss.mean()
    num_valid = (target != ignore_index).sum().clamp(min=1)
    return loss.sum() / num_valid
