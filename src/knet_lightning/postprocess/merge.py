"""Post-processing of K-Net outputs: semantic argmax, instance top-k, panoptic merge.

Follows the official K-Net test path: ``KernelIterHead.simple_test``, ``get_panoptic`` and
``merge_stuff_thing`` in ``knet/det/kernel_iter_head.py``, ``rescale_masks`` in
``knet/det/kernel_update_head.py``. All functions work on ONE image
(images in a batch have different unpadded and original sizes), run without autograd and
accept logits in any float dtype (they are promoted to fp32). The masks are resized to the original image as the official
``rescale_masks`` does (:mod:`knet_lightning.postprocess.rescale`); the panoptic merge can skip
the full-resolution maps (:mod:`knet_lightning.postprocess.sparse_merge`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from knet_lightning.postprocess.rescale import (
    RESCALE_CHUNK,
    check_logits,
    check_sizes,
    rescale_maps,
    rescale_probs_chunks,
)
from knet_lightning.postprocess.sparse_merge import exact_count_dtype, merge_sparse

__all__ = ["instance_inference", "panoptic_inference", "panoptic_to_semantic", "semantic_inference"]


def _possible_owners(mask_logits: Tensor, scores: Tensor, margin: float = 1e-5) -> Tensor:
    """Indices of the kernels that can win the ``score * prob`` argmax at some output pixel.

    Every output pixel is a convex combination (bilinear taps, resize after resize, crop) of
    the stride-4 probabilities in a 3x3 window of cells: one tap pair of the final resize
    falls on adjacent pixels of the upsampled map, whose own taps span at most three cells.
    Over such a window, kernel n is at most ``U_n = s_n * max(p_n)`` and kernel m at least
    ``L_m = s_m * min(p_m)``; a kernel with ``U_n < max_{m != n} L_m`` in every window is
    beaten everywhere. ``margin`` absorbs float rounding of the interpolation weights.

    Args:
        mask_logits: ``(N, h, w)`` mask logits at network stride.
        scores: ``(N,)`` kernel scores.

    Returns:
        ``(K,)`` ascending kernel indices, a superset of the kernels that own a pixel.
    """
    probs = mask_logits.float().sigmoid().unsqueeze(0)  # (1, N, h, w)
    upper = F.max_pool2d(probs, 3, stride=1, padding=1)[0] * scores[:, None, None]
    lower = -F.max_pool2d(-probs, 3, stride=1, padding=1)[0] * scores[:, None, None]
    if lower.shape[0] == 1:
        return torch.zeros(1, dtype=torch.long, device=mask_logits.device)
    first, first_idx = lower.max(dim=0)  # (h, w)
    second = lower.scatter(0, first_idx[None], float("-inf")).amax(dim=0)
    kernel = torch.arange(lower.shape[0], device=lower.device)[:, None, None]
    # the strongest lower bound among the *other* kernels
    best_other = torch.where(first_idx[None] == kernel, second[None], first[None])
    possible = (upper + margin >= best_other - margin).flatten(1).any(dim=1)
    return possible.nonzero().flatten()


# Maps rescaled at once by the CPU's dense merge and semantic argmax (see _merge_dense).
_CPU_DENSE_CHUNK = 8


def _areas(probs: Tensor, mask_thr: float, by_map: bool) -> Tensor:
    """``(n,)`` int64 ``prob >= mask_thr`` pixel counts of ``probs`` ``(n, H, W)``: one map at a
    time on the CPU (each map read while the cache holds it), in one chunk-wide op on GPUs."""
    if not by_map:  # summing floats is about twice as fast as summing bools here
        return (probs >= mask_thr).flatten(1).to(exact_count_dtype(probs[0].numel())).sum(1).long()
    mask = torch.empty(probs.shape[1:], dtype=torch.bool, device=probs.device)
    return torch.stack([torch.count_nonzero(torch.ge(prob, mask_thr, out=mask)) for prob in probs])


def _fold_argmax(maps: Tensor, start: int, best: Tensor, arg: Tensor, by_map: bool) -> None:
    """Folds maps ``start .. start + n - 1`` ``(n, H, W)`` into the running ``best`` and ``arg``
    ``(H, W)`` in place; strict '>' gives a tie to the first map, as torch.argmax. ``by_map``
    (the CPU): one map at a time; else in whole-chunk ops (GPUs)."""
    if not by_map:
        chunk_best, chunk_arg = maps.max(dim=0)
        better = chunk_best > best
        torch.where(better, chunk_best, best, out=best)
        torch.where(better, chunk_arg + start, arg, out=arg)
        return
    better = torch.empty(best.shape, dtype=torch.bool, device=best.device)
    for j in range(maps.shape[0]):
        torch.gt(maps[j], best, out=better)
        torch.where(better, maps[j], best, out=best)
        arg.masked_fill_(better, start + j)


def _merge_dense(
    mask_logits: Tensor,
    scores: Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_thr: float,
    prune: bool,
    candidates: Tensor | None = None,
    by_map: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Owner map and original mask areas from full-resolution maps, as the official code.

    Same contract as :func:`~knet_lightning.postprocess.sparse_merge.merge_sparse`; the masks are rescaled with ``F.interpolate``
    (in kernel chunks of a multiple of 8, which keep each value bit for bit that of one call on
    all the maps, as the official code makes; a pruned subset is its own call, where a
    downsampling resize may round a value differently in the last bit). ``candidates``: the
    kernels that can own a pixel, when already known (else found here if ``prune``). ``by_map``:
    fold the maps one at a time (default on the CPU) or chunk-wide (default on GPUs).
    """
    num_kernels, device = mask_logits.shape[0], mask_logits.device
    # Only kernels that can win some pixel need the full-resolution work; the others
    # never own a pixel and are never kept, so the result is the same without them.
    if candidates is None:
        candidates = _possible_owners(mask_logits, scores) if prune else torch.arange(num_kernels, device=device)

    # Running argmax of score * prob over the candidates, in their order; the CPU folds the maps
    # one at a time, 8 rescaled at once (about what a cache holds), into reused buffers, where
    # whole-chunk ops each stream the chunk through memory (1.6-1.8x, scripts/bench.py).
    by_map = not mask_logits.is_cuda if by_map is None else by_map
    best = torch.full(output_size, float("-inf"), device=device)
    arg = torch.zeros(output_size, dtype=torch.long, device=device)
    area = torch.zeros(len(candidates), dtype=torch.long, device=device)
    cand_scores = scores[candidates]
    chunk = _CPU_DENSE_CHUNK if by_map else RESCALE_CHUNK
    for start, probs in rescale_probs_chunks(mask_logits[candidates], image_size, padded_size, output_size, chunk):
        n = probs.shape[0]
        area[start : start + n] = _areas(probs, mask_thr, by_map)
        _fold_argmax(probs.mul_(cand_scores[start : start + n, None, None]), start, best, arg, by_map)
    area_orig = torch.zeros(num_kernels, dtype=torch.long, device=device)
    area_orig[candidates] = area
    owner = candidates[arg]
    return owner, area_orig


# method="auto" falls back to the dense merge when more than this fraction of the dense
# merge's values would be evaluated (set below the measured CPU break-even, with a margin;
# see the README's Benchmarks).
_AUTO_MAX_EVAL_FRACTION = 0.08
# ... and below this many dense values, where its fixed per-call cost does not pay off.
_AUTO_MIN_VALUES = 1 << 21


@torch.no_grad()
def panoptic_inference(
    mask_logits: Tensor,
    cls_logits: Tensor,
    num_things: int,
    num_proposals: int,
    image_size: Sequence[int],
    padded_size: Sequence[int],
    output_size: Sequence[int],
    object_mask_thr: float = 0.3,
    overlap_thr: float = 0.6,
    mask_thr: float = 0.5,
    method: str = "auto",
    prune: bool = True,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Merge thing and stuff kernels of one image into a panoptic segmentation (the official
    ``get_panoptic`` / ``merge_stuff_thing`` in ``knet/det/kernel_iter_head.py``).

    Kernels ``0..num_proposals-1`` are thing proposals: score and label are the max over
    the thing columns ``[0, num_things)``. Kernel ``num_proposals + k`` is stuff class
    ``num_things + k`` with score = its own column (the diagonal). Every pixel goes to the
    kernel with the largest ``score * mask_prob``. Kernels are then visited by descending
    score: a thing below ``object_mask_thr`` is dropped (stuff has no score threshold), and
    any kernel keeping less than ``overlap_thr`` of its original mask (``prob >= mask_thr``)
    after the argmax is dropped. Pixels of dropped kernels are void.

    The official loop's decisions are independent per kernel (the argmax owner map is
    fixed before the loop), so they are made here in one vectorised step; the loop order
    only decides the segment ids, which follow descending score.

    Args:
        mask_logits: ``(N, h4, w4)`` stride-4 mask logits of one image, ``N >= num_proposals``.
        cls_logits: ``(N, C)`` sigmoid class logits, C = num_classes (things first).
        num_things: number of thing classes.
        num_proposals: number of thing kernels; the remaining ``N - num_proposals`` are stuff
            kernels (may be 0).
        image_size: ``(h, w)`` unpadded network input size.
        padded_size: ``(Hp, Wp)`` padded network input size.
        output_size: ``(H, W)`` size of the returned map (the original image size).
        object_mask_thr: thing score threshold (official ``instance_score_thr``).
        overlap_thr: minimum kept/original area ratio (official ``overlap_thr``).
        mask_thr: probability threshold of the original mask area.
        method: ``"dense"`` rescales every (possible) owner to the output size with
            ``F.interpolate``, bit for bit the official values; ``"sparse"`` settles blocks
            of pixels from per-cell bounds and evaluates the composed bilinear taps only
            where the bounds overlap (much faster on CPU, see the README's Benchmarks; a pixel
            can differ only where two kernels tie to float rounding, ~1e-7 relative);
            ``"auto"``: sparse on CPU unless the bounds leave over 8% of the values to
            evaluate (noisy outputs) or there are under 2M values; dense then and on GPUs
            (where the dense maps are cheap and the sparse path would wait on host syncs).
        prune: with ``method="dense"``, skip kernels that cannot own any pixel (exact).

    Returns:
        ``pan_seg`` ``(H, W)`` int32 segment ids (0 = void), and ``segments_info``: one dict
        per segment, in id order, with ``id`` (int, 1..), ``category_id`` (contiguous class
        id), ``isthing`` (bool) and ``score`` (float).
    """
    num_kernels, num_classes = check_logits(mask_logits, cls_logits)
    num_stuff = _check_panoptic_kernels(num_kernels, num_classes, num_things, num_proposals)
    img, pad, out = check_sizes(image_size, padded_size, output_size)
    if method not in ("auto", "sparse", "dense"):
        raise ValueError(f"postprocess: `method` must be 'auto', 'sparse' or 'dense', got {method!r}")
    scores, labels, isthing = _kernel_scores(cls_logits, num_things, num_proposals, num_stuff, mask_logits.device)
    owner, area_orig = _owner_map(mask_logits, scores, img, pad, out, mask_thr, method, prune)
    keep = _kept_kernels(owner, area_orig, scores, isthing, object_mask_thr, overlap_thr)
    return _numbered_segments(owner, keep, scores, labels, isthing)


def _check_panoptic_kernels(num_kernels: int, num_classes: int, num_things: int, num_proposals: int) -> int:
    """The number of stuff kernels, once the kernel and class counts are consistent."""
    if num_kernels == 0:
        raise ValueError("postprocess: `mask_logits` has no kernels (N = 0)")
    if not 0 <= num_proposals <= num_kernels:
        raise ValueError(f"postprocess: `num_proposals` ({num_proposals}) must be in [0, N={num_kernels}]")
    num_stuff = num_kernels - num_proposals
    if not 0 <= num_things <= num_classes or num_things + num_stuff > num_classes:
        raise ValueError(
            f"postprocess: `num_things` ({num_things}) + stuff kernels ({num_stuff}) must not exceed "
            f"the {num_classes} columns of `cls_logits`"
        )
    if num_proposals > 0 and num_things == 0:
        raise ValueError("postprocess: thing proposals need `num_things` > 0")
    return num_stuff


def _kernel_scores(
    cls_logits: Tensor, num_things: int, num_proposals: int, num_stuff: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """``(scores, labels, isthing)``, each ``(N,)``: a thing proposal's best thing class and its
    probability; stuff kernel ``k``'s own class ``num_things + k`` and its probability (the diagonal)."""
    probs_cls = cls_logits.float().sigmoid()
    thing_scores, thing_labels = probs_cls[:num_proposals, :num_things].max(dim=1)
    stuff_scores = probs_cls[num_proposals:, num_things : num_things + num_stuff].diagonal()
    stuff_labels = torch.arange(num_stuff, device=device) + num_things
    scores = torch.cat([thing_scores, stuff_scores])
    labels = torch.cat([thing_labels, stuff_labels])
    isthing = torch.arange(num_proposals + num_stuff, device=device) < num_proposals
    return scores, labels, isthing


def _owner_map(
    mask_logits: Tensor,
    scores: Tensor,
    img: tuple[int, int],
    pad: tuple[int, int],
    out: tuple[int, int],
    mask_thr: float,
    method: str,
    prune: bool,
) -> tuple[Tensor, Tensor]:
    """``owner`` ``(H, W)``: the kernel with the largest ``score * prob`` at every output pixel;
    ``area_orig`` ``(N,)``: each kernel's ``prob >= mask_thr`` area; by the sparse or the dense
    merge as ``method`` chooses (see :func:`panoptic_inference`)."""
    num_kernels = mask_logits.shape[0]
    merged: tuple[Tensor, Tensor] | Tensor | None = None
    small = num_kernels * out[0] * out[1] < _AUTO_MIN_VALUES
    if method == "sparse" or (method == "auto" and not mask_logits.is_cuda and not small):
        # auto: sparse unless the outputs are too noisy for the bounds to settle most pixels
        fraction = _AUTO_MAX_EVAL_FRACTION if method == "auto" else None
        merged = merge_sparse(mask_logits.float().sigmoid(), scores, img, pad, out, mask_thr, fraction)
    if not isinstance(merged, tuple):  # dense, or the sparse merge gave up with the candidates
        merged = _merge_dense(mask_logits, scores, img, pad, out, mask_thr, prune, candidates=merged)
    return merged


def _kept_kernels(
    owner: Tensor, area_orig: Tensor, scores: Tensor, isthing: Tensor, object_mask_thr: float, overlap_thr: float
) -> Tensor:
    """``(N,)`` bool: the kernels that become segments. A thing needs ``object_mask_thr`` (stuff
    has no score threshold); every kernel must own pixels and keep ``overlap_thr`` of its mask."""
    area_kept = torch.bincount(owner.flatten(), minlength=scores.shape[0])
    keep = (~isthing | (scores >= object_mask_thr)) & (area_kept > 0) & (area_orig > 0)
    keep &= area_kept.double() / area_orig.clamp(min=1).double() >= overlap_thr
    return keep


def _numbered_segments(
    owner: Tensor, keep: Tensor, scores: Tensor, labels: Tensor, isthing: Tensor
) -> tuple[Tensor, list[dict[str, Any]]]:
    """``pan_seg`` with segment ids 1..K in descending-score order (the official visiting order),
    0 where the owner was dropped, and ``segments_info`` in id order."""
    order = torch.argsort(scores, descending=True, stable=True)
    kept_order = order[keep[order]]
    id_of_kernel = torch.zeros(scores.shape[0], dtype=torch.int32, device=owner.device)
    id_of_kernel[kept_order] = torch.arange(1, kept_order.numel() + 1, dtype=torch.int32, device=owner.device)
    pan_seg = id_of_kernel[owner]
    segments_info = [
        {"id": i + 1, "category_id": int(lab), "isthing": bool(th), "score": float(sc)}
        for i, (lab, th, sc) in enumerate(
            zip(labels[kept_order].tolist(), isthing[kept_order].tolist(), scores[kept_order].tolist())
        )
    ]
    return pan_seg, segments_info


@torch.no_grad()
def instance_inference(
    mask_logits: Tensor,
    cls_logits: Tensor,
    image_size: Sequence[int],
    padded_size: Sequence[int],
    output_size: Sequence[int],
    max_per_img: int = 100,
    mask_thr: float = 0.5,
) -> dict[str, Tensor]:
    """Top-k (kernel, class) pairs of one image, no NMS (the official ``KernelIterHead.simple_test``).

    The N x C sigmoid scores are flattened and the ``max_per_img`` best pairs kept, so one
    kernel can appear with several classes. The score is the class probability only.

    Args:
        mask_logits: ``(N, h4, w4)`` stride-4 mask logits.
        cls_logits: ``(N, C)`` sigmoid class logits.
        image_size: ``(h, w)`` unpadded network input size.
        padded_size: ``(Hp, Wp)`` padded network input size.
        output_size: ``(H, W)`` original image size.
        max_per_img: number of detections kept (clamped to N*C).
        mask_thr: mask probability threshold (strict ``>``, as the official code).

    Returns:
        dict with ``masks`` bool ``(K, H, W)``, ``scores`` float ``(K,)`` (descending) and
        ``labels`` int64 ``(K,)``, K = min(max_per_img, N*C).
    """
    num_kernels, num_classes = check_logits(mask_logits, cls_logits)
    if num_kernels == 0 or num_classes == 0:
        raise ValueError(f"postprocess: `cls_logits` must have N >= 1 and C >= 1, got {tuple(cls_logits.shape)}")
    if max_per_img <= 0:
        raise ValueError(f"postprocess: `max_per_img` must be positive, got {max_per_img}")
    img, pad, out = check_sizes(image_size, padded_size, output_size)
    k = min(max_per_img, num_kernels * num_classes)
    scores, flat_idx = cls_logits.float().sigmoid().flatten().topk(k, sorted=True)
    kernel_idx = flat_idx // num_classes
    labels = flat_idx % num_classes
    # A kernel picked with several classes is rescaled once.
    uniq, inverse = torch.unique(kernel_idx, return_inverse=True)
    probs = torch.cat([p for _, p in rescale_probs_chunks(mask_logits[uniq], img, pad, out)])
    masks = probs[inverse] > mask_thr
    return {"masks": masks, "scores": scores, "labels": labels}


@torch.no_grad()
def semantic_inference(
    seg_logits: Tensor,
    image_size: Sequence[int],
    padded_size: Sequence[int],
    output_size: Sequence[int],
) -> Tensor:
    """Per-pixel argmax of one image's class logits at the original size.

    Args:
        seg_logits: ``(C, h, w)`` class logits covering the padded input (any stride).
        image_size: ``(h_img, w_img)`` unpadded network input size.
        padded_size: ``(Hp, Wp)`` padded network input size.
        output_size: ``(H, W)`` original image size.

    Returns:
        ``(H, W)`` int64 class ids.
    """
    if seg_logits.dim() != 3:
        raise ValueError(f"postprocess: `seg_logits` must be (C, h, w), got shape {tuple(seg_logits.shape)}")
    if seg_logits.shape[0] == 0:
        raise ValueError("postprocess: `seg_logits` has no classes (C = 0)")
    img, pad, out = check_sizes(image_size, padded_size, output_size)
    # Argmax only needs the running max over classes, so chunk over classes to bound memory;
    # the CPU folds the maps one at a time, as the panoptic merge does.
    device = seg_logits.device
    best = torch.full(out, float("-inf"), device=device)
    arg = torch.zeros(out, dtype=torch.long, device=device)
    chunk = RESCALE_CHUNK if seg_logits.is_cuda else _CPU_DENSE_CHUNK
    for start in range(0, seg_logits.shape[0], chunk):
        logits = rescale_maps(seg_logits[start : start + chunk], img, pad, out)
        _fold_argmax(logits, start, best, arg, by_map=not seg_logits.is_cuda)
    return arg


@torch.no_grad()
def panoptic_to_semantic(pan_seg: Tensor, segments_info: Sequence[dict[str, Any]], ignore_index: int = 255) -> Tensor:
    """Semantic map from a panoptic one: each pixel gets its segment's class.

    Args:
        pan_seg: ``(H, W)`` integer segment ids, 0 = void.
        segments_info: dicts with ``id`` and ``category_id`` for every non-zero id in ``pan_seg``.
        ignore_index: value written to void pixels and to ids missing from ``segments_info``.

    Returns:
        ``(H, W)`` int64 class ids.
    """
    if pan_seg.dim() != 2:
        raise ValueError(f"postprocess: `pan_seg` must be (H, W), got shape {tuple(pan_seg.shape)}")
    flat = pan_seg.long()
    if len(segments_info) == 0:
        return torch.full_like(flat, ignore_index)
    try:
        ids = torch.tensor([int(s["id"]) for s in segments_info], dtype=torch.long, device=flat.device)
        cats = torch.tensor([int(s["category_id"]) for s in segments_info], dtype=torch.long, device=flat.device)
    except KeyError as err:
        raise ValueError(
            f"postprocess: every segments_info entry needs `id` and `category_id` (missing {err})"
        ) from err
    sorted_ids, perm = ids.sort()
    pos = torch.searchsorted(sorted_ids, flat).clamp(max=sorted_ids.numel() - 1)
    found = sorted_ids[pos] == flat
    return torch.where(found, cats[perm][pos], torch.full_like(flat, ignore_index))
