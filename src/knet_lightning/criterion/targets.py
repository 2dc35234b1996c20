"""The ground truth of a batch as the K-Net criterion reads it: masks at the stride of the mask
logits (:data:`MASK_ASSIGN_STRIDE`), things apart from stuff (:func:`prepare_targets`), and the
per-pixel owner of a set of masks (:func:`last_cover`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MASK_ASSIGN_STRIDE", "Targets", "downsample", "last_cover", "prepare_targets", "read_target"]

# GT masks are padded to the image size and downsampled to the stride of the loss maps.
MASK_ASSIGN_STRIDE = 4


@dataclass
class Targets:
    """Ground truth of one batch at stride 4.

    Attributes:
        thing_masks: ``B`` soft float tensors ``(G_b, h, w)``.
        thing_labels: ``B`` int64 tensors ``(G_b,)`` in ``[0, num_things)``.
        stuff_masks: ``(B, num_stuff, h, w)`` soft stuff masks, zero where a class is absent.
        stuff_present: ``(B, num_stuff)`` bool, class present in the (full-resolution) image.
    """

    thing_masks: list[Tensor]
    thing_labels: list[Tensor]
    stuff_masks: Tensor
    stuff_present: Tensor


def last_cover(masks: Tensor, rows: Tensor) -> Tensor:
    """Index of the last selected mask covering each pixel (later masks overwrite earlier ones).

    Only the selected rows are read: the positives are a few of the N kernels, so this
    avoids an (B, N, h, w) int64 pass per stage.

    Args:
        masks: ``(B, K, h, w)`` float targets; a pixel is covered where the target is > 0.
        rows: ``(B, K)`` bool, the masks that may cover.

    Returns:
        ``(B, h, w)`` int64, ``-1`` where no selected mask covers the pixel.
    """
    B, _, h, w = masks.shape
    out = torch.full((B, h, w), -1, dtype=torch.long, device=masks.device)
    img, k = rows.nonzero(as_tuple=True)
    if img.numel() > 0:
        covering = torch.where(masks[img, k] > 0, k[:, None, None], -1).flatten(1)  # (P, h*w)
        out.view(B, h * w).scatter_reduce_(0, img[:, None].expand_as(covering), covering, "amax")
    return out


def downsample(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (``align_corners=False``, no antialias, as mmdet) resize of ``(K, H, W)`` masks."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]


def prepare_targets(
    targets: Sequence[dict[str, Any]],
    size: tuple[int, int],
    device: torch.device,
    *,
    num_things: int,
    num_stuff: int,
    stuff_kernels: bool,
) -> Targets:
    """The batch's ground truth at stride 4 (``size``): crowd segments and empty stuff ones
    dropped, things and stuff apart, padded to ``4 * size`` and downsampled ×4.

    Args:
        targets: ``B`` target dicts of the batch contract (see :func:`read_target`).
        size: ``(h, w)`` of the stride-4 mask logits.
        device: where the targets go.
        num_things, num_stuff: the classes (things first, then stuff).
        stuff_kernels: the network has stuff kernels (panoptic); without them stuff
            segments are dropped (instance).
    """
    h, w = size
    pad_h, pad_w = MASK_ASSIGN_STRIDE * h, MASK_ASSIGN_STRIDE * w
    T, S = num_things, num_stuff
    thing_full: list[Tensor] = []
    thing_labels: list[Tensor] = []
    stuff_full: list[Tensor] = []
    stuff_img: list[Tensor] = []
    stuff_cls: list[Tensor] = []
    for b, tgt in enumerate(targets):
        masks, labels, crowd = read_target(
            b, tgt, pad_h, pad_w, device, num_things=num_things, num_stuff=num_stuff, stuff_kernels=stuff_kernels
        )
        mh, mw = masks.shape[-2:]
        # A thing whose mask the resize emptied stays a target: mmdet's Resize / RandomFlip /
        # Pad drop no mask and the official KNet.forward_train (knet/det/knet.py) matches
        # every gt_mask. An emptied stuff class is gone, as sem2ins_masks (knet/det/utils.py)
        # reads the stuff targets off the classes present in the resized semantic map.
        keep = ~crowd & ((labels < T) | masks.flatten(1).any(1))
        masks, labels = masks[keep], labels[keep]
        is_thing = labels < T
        pad = (0, pad_w - mw, 0, pad_h - mh)
        thing_full.append(F.pad(masks[is_thing].float(), pad))
        thing_labels.append(labels[is_thing])
        if stuff_kernels:
            stuff_idx = labels[~is_thing] - T
            # Several segments of one stuff class form one stuff target (``sem2ins_masks``).
            uniq, inv = torch.unique(stuff_idx, return_inverse=True)
            union = masks.new_zeros((uniq.numel(), mh, mw), dtype=torch.float32)
            union.index_add_(0, inv, masks[~is_thing].float()).clamp_(max=1.0)
            stuff_full.append(F.pad(union, pad))
            stuff_img.append(torch.full_like(uniq, b))
            stuff_cls.append(uniq)

    counts = [int(t.shape[0]) for t in thing_full]
    things = downsample(torch.cat(thing_full), (h, w))
    B = len(targets)
    stuff_masks = torch.zeros((B, S, h, w), device=device)
    stuff_present = torch.zeros((B, S), dtype=torch.bool, device=device)
    if stuff_kernels:
        img_idx, cls_idx = torch.cat(stuff_img), torch.cat(stuff_cls)
        stuff_masks[img_idx, cls_idx] = downsample(torch.cat(stuff_full), (h, w))
        stuff_present[img_idx, cls_idx] = True
    return Targets(list(things.split(counts)), thing_labels, stuff_masks, stuff_present)


def read_target(
    b: int,
    tgt: dict[str, Any],
    pad_h: int,
    pad_w: int,
    device: torch.device,
    *,
    num_things: int,
    num_stuff: int,
    stuff_kernels: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate ``targets[b]`` (``masks`` bool ``(K, h, w)`` at most ``pad_h x pad_w``, ``labels``
    int64 ``(K,)``, optional ``iscrowd`` bool ``(K,)``) and return ``masks, labels, iscrowd`` on
    ``device``; without ``stuff_kernels`` the stuff segments count as crowd (dropped)."""
    for key in ("masks", "labels"):
        if key not in tgt:
            raise KeyError(f"KNetCriterion: targets[{b}] has no {key!r} entry")
    # ``as_subclass`` drops tv_tensors wrappers (Mask) so that later ops return plain tensors.
    masks = torch.as_tensor(tgt["masks"], device=device).as_subclass(Tensor)
    labels = torch.as_tensor(tgt["labels"], device=device).as_subclass(Tensor)
    if masks.dim() != 3:
        raise ValueError(f"KNetCriterion: targets[{b}]['masks'] must be (K, h, w), got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        if masks.is_floating_point() or not ((masks == 0) | (masks == 1)).all():
            raise ValueError(f"KNetCriterion: targets[{b}]['masks'] must be bool (or 0/1 integers), got {masks.dtype}")
        masks = masks.bool()
    K, mh, mw = masks.shape
    if labels.dim() != 1 or labels.shape[0] != K or labels.is_floating_point():
        raise ValueError(
            f"KNetCriterion: targets[{b}]['labels'] must be int64 ({K},) to match its masks, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    labels = labels.long()
    if K > 0 and (int(labels.min()) < 0 or int(labels.max()) >= num_things + num_stuff):
        raise ValueError(
            f"KNetCriterion: targets[{b}]['labels'] must lie in [0, {num_things + num_stuff}) "
            f"(things first, then stuff); got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    if mh > pad_h or mw > pad_w:
        raise ValueError(
            f"KNetCriterion: targets[{b}]['masks'] are {mh}x{mw} but the stride-4 mask logits only "
            f"cover {pad_h}x{pad_w} pixels; targets must be at the (unpadded) network input size"
        )
    crowd = tgt.get("iscrowd")
    if crowd is None:
        crowd = torch.zeros(K, dtype=torch.bool, device=device)
    else:
        crowd = torch.as_tensor(crowd, device=device).bool()
        if crowd.shape != (K,):
            raise ValueError(f"KNetCriterion: targets[{b}]['iscrowd'] must be bool ({K},), got {tuple(crowd.shape)}")
    if not stuff_kernels:
        # Instance mode learns things only; stuff segments of a panoptic data set are dropped.
        crowd = crowd | (labels >= num_things)
    return masks, labels, crowd
