"""Post-processing of K-Net outputs: semantic argmax, instance top-k, panoptic merge.

Follows the official K-Net test path (``KernelIterHead.simple_test``, ``get_panoptic``,
``merge_stuff_thing``, ``rescale_masks``); see spec §4. All functions work on ONE image
(images in a batch have different unpadded and original sizes), run without autograd and
accept logits in any float dtype (they are promoted to fp32).

Mask resizing ("rescale_masks"): sigmoid at stride 4 -> bilinear to the padded network
input size -> crop to the unpadded input size -> bilinear to the original image size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "instance_inference",
    "panoptic_inference",
    "panoptic_to_semantic",
    "rescale_maps",
    "semantic_inference",
]

# Kernels are rescaled in chunks so that N x H x W float maps at padded size never exist
# all at once (153 kernels at 800x1216 would be ~600 MB). Bilinear resizing is
# per-channel, so chunking does not change any value.
_RESCALE_CHUNK = 32


def _check_size(name: str, size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"postprocess: `{name}` must be (height, width) with positive entries, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _check_sizes(
    image_size: Sequence[int], padded_size: Sequence[int], output_size: Sequence[int]
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    img = _check_size("image_size", image_size)
    pad = _check_size("padded_size", padded_size)
    out = _check_size("output_size", output_size)
    if img[0] > pad[0] or img[1] > pad[1]:
        raise ValueError(f"postprocess: `image_size` {img} must fit inside `padded_size` {pad}")
    return img, pad, out


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(C, h, w)`` to ``(C, *size)``; a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)


def rescale_maps(
    maps: Tensor,
    image_size: Sequence[int],
    padded_size: Sequence[int],
    output_size: Sequence[int],
) -> Tensor:
    """Resize per-channel maps from network scale back to the original image.

    Args:
        maps: ``(C, h, w)`` maps covering the padded network input (any stride).
        image_size: ``(h_img, w_img)`` unpadded network input size.
        padded_size: ``(Hp, Wp)`` padded network input size.
        output_size: ``(H, W)`` original image size.

    Returns:
        ``(C, H, W)`` float32: bilinear to ``padded_size``, crop to ``image_size``, bilinear
        to ``output_size`` (the official ``rescale_masks``).
    """
    if maps.dim() != 3:
        raise ValueError(f"postprocess: maps must be (C, h, w), got shape {tuple(maps.shape)}")
    img, pad, out = _check_sizes(image_size, padded_size, output_size)
    x = _resize(maps.float(), pad)[:, : img[0], : img[1]]
    return _resize(x, out)


def _rescale_probs_chunks(
    mask_logits: Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
):
    """Yield ``(start, probs)`` with ``probs`` ``(n, H, W)`` rescaled sigmoid masks, chunk by chunk."""
    for start in range(0, mask_logits.shape[0], _RESCALE_CHUNK):
        chunk = mask_logits[start : start + _RESCALE_CHUNK].float().sigmoid()
        yield start, rescale_maps(chunk, image_size, padded_size, output_size)


def _check_logits(mask_logits: Tensor, cls_logits: Tensor) -> tuple[int, int]:
    if mask_logits.dim() != 3:
        raise ValueError(
            f"postprocess: `mask_logits` must be (N, h, w) for one image, got shape {tuple(mask_logits.shape)}"
        )
    if cls_logits.dim() != 2 or cls_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            f"postprocess: `cls_logits` must be (N, C) with N = {mask_logits.shape[0]} "
            f"(from mask_logits), got shape {tuple(cls_logits.shape)}"
        )
    return int(cls_logits.shape[0]), int(cls_logits.shape[1])


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


def _count_dtype(num_pixels: int) -> torch.dtype:
    """Float dtype whose sums of up to ``num_pixels`` ones are exact integers."""
    return torch.float32 if num_pixels <= 2**24 else torch.float64


def _merge_dense(
    mask_logits: Tensor,
    scores: Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_thr: float,
    prune: bool,
    candidates: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Owner map and original mask areas from full-resolution maps, as the official code.

    Same contract as :func:`_merge_sparse`; the masks are rescaled with ``F.interpolate``
    (in kernel chunks), so every value is bit for bit the official one. ``candidates``: the
    kernels that can own a pixel, when already known (else found here if ``prune``).
    """
    num_kernels, device = mask_logits.shape[0], mask_logits.device
    img, pad, out = image_size, padded_size, output_size
    # Only kernels that can win some pixel need the full-resolution work; the others
    # never own a pixel and are never kept, so the result is the same without them.
    if candidates is None:
        candidates = _possible_owners(mask_logits, scores) if prune else torch.arange(num_kernels, device=device)

    # Running argmax of score * prob over kernel chunks; strict '>' keeps the first
    # maximum, like torch.argmax over all kernels at once.
    best = torch.full(out, -1.0, device=device)
    owner = torch.zeros(out, dtype=torch.long, device=device)
    area_orig = torch.zeros(num_kernels, dtype=torch.long, device=device)
    cand_scores = scores[candidates]
    for start, probs in _rescale_probs_chunks(mask_logits[candidates], img, pad, out):
        n = probs.shape[0]
        # summing floats is about twice as fast as summing bools here
        count_dtype = _count_dtype(probs[0].numel())
        area_orig[candidates[start : start + n]] = (probs >= mask_thr).flatten(1).to(count_dtype).sum(1).long()
        cur_prob = cand_scores[start : start + n, None, None] * probs
        chunk_best, chunk_arg = cur_prob.max(dim=0)
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        owner = torch.where(better, candidates[chunk_arg + start], owner)
    return owner, area_orig


# ---------------------------------------------------------------- sparse panoptic merge
#
# The official merge evaluates score * prob for every kernel at every output pixel
# (153 x H x W values), yet almost every pixel has one clear winner and almost every
# kernel is far from the 0.5 threshold there. The sparse merge bounds each kernel over
# the few stride-4 cells an output pixel is interpolated from, settles whole blocks of
# pixels from those bounds, and evaluates exact values only where the bounds overlap.

# Relative slack on the bounds. An interpolated value is a convex combination of at most
# 16 taps with float32 weights, so it lies within a few ulps (~1e-6 relative) of
# [min, max] of its taps; 1e-5 keeps every decision that is not certain for evaluation.
_BOUND_EPS = 1e-5
# Pair x pixel slots evaluated at once (bounds the temporary memory).
_EVAL_SLOTS = 1 << 22
# method="auto" falls back to the dense merge when more than this fraction of the dense
# merge's values would be evaluated (the break-even measured on this CPU is ~15%).
_AUTO_MAX_EVAL_FRACTION = 0.08
# ... and below this many dense values, where its fixed cost (~1 ms) does not pay off.
_AUTO_MIN_VALUES = 1 << 21


def _linear_source(n_out: int, n_in: int) -> tuple[Tensor, Tensor, Tensor]:
    """Taps of a 1-D bilinear resize ``n_in -> n_out`` (align_corners=False, torch's rules).

    Returns ``(i0, i1, lam)`` of length ``n_out``: output ``o`` reads
    ``(1 - lam[o]) * x[i0[o]] + lam[o] * x[i1[o]]``; the identity when the sizes match.
    """
    out = torch.arange(n_out, dtype=torch.float64)
    if n_out == n_in:
        idx = out.long()
        return idx, idx, torch.zeros(n_out, dtype=torch.float64)
    src = ((out + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam = (src - i0).clamp(0.0, 1.0)
    return i0, i1, lam


def _axis_taps(n_out: int, n_img: int, n_pad: int, n_in: int) -> tuple[Tensor, Tensor]:
    """Composed taps of resize ``n_in -> n_pad``, crop to ``n_img``, resize ``-> n_out``.

    Returns ``start`` ``(n_out,)`` and ``weights`` ``(n_out, K)`` float32: output ``o`` is
    ``sum_k weights[o, k] * x[start[o] + k]``, with the window ``[start, start + K)``
    inside ``[0, n_in)``. K is the widest window any output needs (2 or 3 for upsampling).
    """
    r0, r1, mu = _linear_source(n_out, n_img)  # into the cropped intermediate map
    j0, j1, lam = _linear_source(n_pad, n_in)  # intermediate row -> stride-4 cells
    taps = torch.stack([j0[r0], j1[r0], j0[r1], j1[r1]], dim=1)  # (n_out, 4)
    w = torch.stack([(1 - mu) * (1 - lam[r0]), (1 - mu) * lam[r0], mu * (1 - lam[r1]), mu * lam[r1]], dim=1)
    first = taps.min(dim=1).values
    span = int((taps.max(dim=1).values - first).max()) + 1
    start = first.clamp(max=n_in - span)
    weights = torch.zeros(n_out, span, dtype=torch.float64).scatter_add_(1, taps - start[:, None], w)
    return start, weights.float()


def _window_reduce(x: Tensor, starts: Tensor, span: int, dim: int, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``fn``-reduce ``x`` over the windows ``[s, s + span)`` along ``dim``, ``s`` in ``starts``."""
    length = x.shape[dim] - span + 1
    out = x.narrow(dim, 0, length)
    for k in range(1, span):  # sliding reduction over every start, from shifted views
        out = fn(out, x.narrow(dim, k, length))
    if starts.numel() == length:  # every start is used (upsampling): no gather needed
        return out
    return out.index_select(dim, starts)


def _groups(start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Runs of equal window starts along one axis (``start`` is non-decreasing).

    Returns ``(starts, first, count)``: the distinct starts, and the first output index and
    the length of each run.
    """
    starts, count = torch.unique_consecutive(start, return_counts=True)
    first = torch.cumsum(count, 0) - count
    return starts, first, count


def _merge_sparse(
    probs: Tensor,
    scores: Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_thr: float,
    max_eval_fraction: float | None = None,
) -> tuple[Tensor, Tensor] | Tensor:
    """Owner map and original mask areas, evaluating exact values only where bounds overlap.

    Args:
        probs: ``(N, h, w)`` float32 stride-4 mask probabilities.
        scores: ``(N,)`` kernel scores.
        max_eval_fraction: give up when the values left to evaluate exceed this fraction of
            the ``N * H * W`` a dense merge computes: per value, the sparse evaluation costs
            about 6x a dense one, so noisy outputs are faster dense.

    Returns:
        ``owner`` ``(H, W)`` int64: argmax over kernels of ``score * prob`` at the output
        size (first kernel on ties); ``area_orig`` ``(N,)`` int64: ``#(prob >= mask_thr)``,
        exact for every kernel that owns a pixel (0 may be returned for the others).
        When it gives up: the ``(K,)`` ascending indices of the kernels that can own a
        pixel, for the dense merge.
    """
    num_kernels, h, w = probs.shape
    device = probs.device
    (out_h, out_w), eps = output_size, _BOUND_EPS
    ystart, wy = (t.to(device) for t in _axis_taps(out_h, image_size[0], padded_size[0], h))
    xstart, wx = (t.to(device) for t in _axis_taps(out_w, image_size[1], padded_size[1], w))
    ky, kx = wy.shape[1], wx.shape[1]
    ys, yfirst, ycount = _groups(ystart)
    xs, xfirst, xcount = _groups(xstart)
    num_r, num_c = ys.numel(), xs.numel()

    # Bounds of every kernel over every block's window of cells: (N, R, C).
    pmax = _window_reduce(_window_reduce(probs, ys, ky, 1, torch.maximum), xs, kx, 2, torch.maximum)
    pmin = _window_reduce(_window_reduce(probs, ys, ky, 1, torch.minimum), xs, kx, 2, torch.minimum)
    pmax, pmin = pmax.flatten(1), pmin.flatten(1)  # (N, B), B = R * C blocks
    block_pixels = (ycount[:, None] * xcount[None, :]).flatten()  # (B,)

    # Ownership: kernel n can win somewhere in block b unless its upper bound (with slack)
    # is below the best lower bound of the other kernels. Comparing every kernel with the
    # best lower bound overall is the same test: the kernel holding it passes anyway, as
    # its upper bound is at least its lower bound. When it is the only one, it owns the block.
    lower = pmin * scores[:, None]
    top_lower, top_idx = lower.max(dim=0)  # (B,)
    contender = pmax * (scores * ((1 + eps) / (1 - eps)))[:, None] >= top_lower[None]  # (N, B)
    settled = contender.sum(dim=0, dtype=torch.int32) == 1
    # A kernel that contends nowhere owns no pixel, so it is never kept: its area is moot
    # and the threshold work below skips it.
    relevant = contender.any(dim=1).nonzero().squeeze(1)  # (K,)
    if relevant.numel() < num_kernels:
        pmin, pmax, contender = pmin[relevant], pmax[relevant], contender[relevant]

    # Original areas: blocks wholly above / below the threshold count at once.
    surely_in = pmin >= mask_thr / (1 - eps)  # (K, B)
    unsure_thr = (pmax >= mask_thr / (1 + eps)) & ~surely_in
    count_dtype = _count_dtype(out_h * out_w)
    area_orig = torch.zeros(num_kernels, dtype=torch.long, device=device)
    area_orig[relevant] = (surely_in.to(count_dtype) @ block_pixels.to(count_dtype)).round().long()

    # (H, W), exact on settled blocks
    owner = top_idx.view(num_r, num_c).repeat_interleave(ycount, 0).repeat_interleave(xcount, 1)

    eval_mask = unsure_thr | (contender & ~settled[None])  # (K, B)
    flat_idx = eval_mask.view(-1).nonzero().squeeze(1)
    if flat_idx.numel() == 0:
        return owner, area_orig
    max_rows, max_cols = int(ycount.max()), int(xcount.max())
    if max_eval_fraction is not None:
        if flat_idx.numel() * max_rows * max_cols > max_eval_fraction * num_kernels * out_h * out_w:
            return relevant
    kernel_idx, block_idx = relevant[flat_idx // eval_mask.shape[1]], flat_idx % eval_mask.shape[1]
    contends = contender.view(-1)[flat_idx]
    counts_thr = unsure_thr.view(-1)[flat_idx]
    # Per run of rows (columns): its output indices, their validity and their weights.
    ly, lx = torch.arange(max_rows, device=device), torch.arange(max_cols, device=device)
    run_rows = (yfirst[:, None] + ly).clamp(max=out_h - 1)  # (R, MR)
    run_cols = (xfirst[:, None] + lx).clamp(max=out_w - 1)  # (C, MC)
    run_row_ok, run_col_ok = ly < ycount[:, None], lx < xcount[:, None]
    run_wy, run_wx = wy[run_rows], wx[run_cols]  # (R, MR, Ky), (C, MC, Kx)
    win_y = ys[:, None] + torch.arange(ky, device=device)  # (R, Ky) cell rows of each run
    win_x = xs[:, None] + torch.arange(kx, device=device)  # (C, Kx)

    best = torch.full((out_h * out_w,), float("-inf"), device=device)
    evaluated: list[tuple[Tensor, Tensor, Tensor]] = []  # (pixel, score * prob, kernel)
    step = max(1, _EVAL_SLOTS // (max_rows * max_cols))
    for lo in range(0, block_idx.numel(), step):
        b, n = block_idx[lo : lo + step], kernel_idx[lo : lo + step]
        gr, gc = b // num_c, b % num_c
        cells = probs[n[:, None, None], win_y[gr][:, :, None], win_x[gc][:, None, :]]  # (P, Ky, Kx)
        wyp, wxp = run_wy[gr], run_wx[gc]  # (P, MR, Ky), (P, MC, Kx)
        # One formula for every pixel, sum_a wy[y, a] * sum_c wx[x, c] * p[a, c], so a value
        # does not depend on which other pixels are evaluated with it.
        val = None
        for a in range(ky):
            inner = wxp[:, :, 0] * cells[:, a, 0, None]
            for c in range(1, kx):
                inner = inner + wxp[:, :, c] * cells[:, a, c, None]  # (P, MC)
            term = wyp[:, :, a, None] * inner[:, None, :]  # (P, MR, MC)
            val = term if val is None else val + term
        assert val is not None
        ok = run_row_ok[gr][:, :, None] & run_col_ok[gc][:, None, :]
        thr = counts_thr[lo : lo + step]
        if bool(thr.any()):
            hits = ((val[thr] >= mask_thr) & ok[thr]).flatten(1).sum(1)
            area_orig.index_add_(0, n[thr], hits)
        sel = contends[lo : lo + step]
        if bool(sel.any()):
            ok_sel = ok[sel]
            pix = (run_rows[gr[sel]][:, :, None] * out_w + run_cols[gc[sel]][:, None, :])[ok_sel]
            cur = (val[sel] * scores[n[sel]][:, None, None])[ok_sel]
            kern = n[sel][:, None, None].expand(-1, max_rows, max_cols)[ok_sel]
            best.scatter_reduce_(0, pix, cur, "amax")
            evaluated.append((pix, cur, kern))
    # the first kernel reaching the maximum, like torch.argmax
    first = torch.full((out_h * out_w,), num_kernels, dtype=torch.long, device=device)
    for pix, cur, kern in evaluated:
        first.scatter_reduce_(0, pix, torch.where(cur == best[pix], kern, num_kernels), "amin")
    flat_owner = owner.flatten()
    if evaluated:
        pix_all = torch.cat([pix for pix, _, _ in evaluated])
        flat_owner[pix_all] = first[pix_all]
    return flat_owner.view(out_h, out_w), area_orig


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
    """Merge thing and stuff kernels of one image into a panoptic segmentation (spec §4).

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
            where the bounds overlap (7x faster on 153 kernels at 512x512 on CPU; a pixel can
            differ only where two kernels tie to float rounding, ~1e-7 relative);
            ``"auto"``: sparse on CPU unless the bounds leave over 8% of the values to
            evaluate (noisy outputs) or there are under 2M values; dense then and on GPUs
            (where the dense maps are cheap and the sparse path would wait on host syncs).
        prune: with ``method="dense"``, skip kernels that cannot own any pixel (exact).

    Returns:
        ``pan_seg`` ``(H, W)`` int32 segment ids (0 = void), and ``segments_info``: one dict
        per segment, in id order, with ``id`` (int, 1..), ``category_id`` (contiguous class
        id), ``isthing`` (bool) and ``score`` (float).
    """
    num_kernels, num_classes = _check_logits(mask_logits, cls_logits)
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
    img, pad, out = _check_sizes(image_size, padded_size, output_size)
    device = mask_logits.device

    probs_cls = cls_logits.float().sigmoid()
    thing_scores, thing_labels = probs_cls[:num_proposals, :num_things].max(dim=1)
    stuff_scores = probs_cls[num_proposals:, num_things : num_things + num_stuff].diagonal()
    stuff_labels = torch.arange(num_stuff, device=device) + num_things
    scores = torch.cat([thing_scores, stuff_scores])  # (N,)
    labels = torch.cat([thing_labels, stuff_labels])  # (N,)
    isthing = torch.arange(num_kernels, device=device) < num_proposals

    if method not in ("auto", "sparse", "dense"):
        raise ValueError(f"postprocess: `method` must be 'auto', 'sparse' or 'dense', got {method!r}")
    merged: tuple[Tensor, Tensor] | Tensor | None = None
    small = num_kernels * out[0] * out[1] < _AUTO_MIN_VALUES
    if method == "sparse" or (method == "auto" and not mask_logits.is_cuda and not small):
        # auto: sparse unless the outputs are too noisy for the bounds to settle most pixels
        fraction = _AUTO_MAX_EVAL_FRACTION if method == "auto" else None
        merged = _merge_sparse(mask_logits.float().sigmoid(), scores, img, pad, out, mask_thr, fraction)
    if not isinstance(merged, tuple):  # dense, or the sparse merge gave up with the candidates
        merged = _merge_dense(mask_logits, scores, img, pad, out, mask_thr, prune, candidates=merged)
    owner, area_orig = merged
    area_kept = torch.bincount(owner.flatten(), minlength=num_kernels)

    keep = (~isthing | (scores >= object_mask_thr)) & (area_kept > 0) & (area_orig > 0)
    keep &= area_kept.double() / area_orig.clamp(min=1).double() >= overlap_thr

    # Segment ids 1..K in descending-score order (the official visiting order).
    order = torch.argsort(scores, descending=True, stable=True)
    kept_order = order[keep[order]]
    id_of_kernel = torch.zeros(num_kernels, dtype=torch.int32, device=device)
    id_of_kernel[kept_order] = torch.arange(1, kept_order.numel() + 1, dtype=torch.int32, device=device)
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
    """Top-k (kernel, class) pairs of one image, no NMS (spec §4 "Instance").

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
    num_kernels, num_classes = _check_logits(mask_logits, cls_logits)
    if num_kernels == 0 or num_classes == 0:
        raise ValueError(f"postprocess: `cls_logits` must have N >= 1 and C >= 1, got {tuple(cls_logits.shape)}")
    if max_per_img <= 0:
        raise ValueError(f"postprocess: `max_per_img` must be positive, got {max_per_img}")
    img, pad, out = _check_sizes(image_size, padded_size, output_size)
    k = min(max_per_img, num_kernels * num_classes)
    scores, flat_idx = cls_logits.float().sigmoid().flatten().topk(k, sorted=True)
    kernel_idx = flat_idx // num_classes
    labels = flat_idx % num_classes
    # A kernel picked with several classes is rescaled once.
    uniq, inverse = torch.unique(kernel_idx, return_inverse=True)
    probs = torch.cat([p for _, p in _rescale_probs_chunks(mask_logits[uniq], img, pad, out)])
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
    img, pad, out = _check_sizes(image_size, padded_size, output_size)
    # Argmax only needs the running max over classes, so chunk over classes to bound memory.
    best: Tensor | None = None
    arg: Tensor | None = None
    for start in range(0, seg_logits.shape[0], _RESCALE_CHUNK):
        logits = rescale_maps(seg_logits[start : start + _RESCALE_CHUNK], img, pad, out)
        chunk_best, chunk_arg = logits.max(dim=0)
        if best is None or arg is None:
            best, arg = chunk_best, chunk_arg
        else:
            better = chunk_best > best
            best = torch.where(better, chunk_best, best)
            arg = torch.where(better, chunk_arg + start, arg)
    assert arg is not None  # C >= 1, so the loop ran
    return arg


@torch.no_grad()
def panoptic_to_semantic(
    pan_seg: Tensor, segments_info: Sequence[dict[str, Any]], ignore_index: int = 255
) -> Tensor:
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
        raise ValueError(f"postprocess: every segments_info entry needs `id` and `category_id` (missing {err})") from err
    sorted_ids, perm = ids.sort()
    pos = torch.searchsorted(sorted_ids, flat).clamp(max=sorted_ids.numel() - 1)
    found = sorted_ids[pos] == flat
    return torch.where(found, cats[perm][pos], torch.full_like(flat, ignore_index))
