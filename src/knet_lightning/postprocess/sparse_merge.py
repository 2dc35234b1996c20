"""The sparse panoptic merge: the official merge's decisions without its full-resolution maps.

The official merge (``get_panoptic`` in the official ``kernel_iter_head.py``) evaluates
score * prob for every kernel at every output pixel (153 x H x W values), yet almost every
pixel has one clear winner and almost every kernel is far from the 0.5 threshold there. This
merge bounds each kernel over the few stride-4 cells an output pixel is interpolated from,
settles whole blocks of pixels from those bounds, and evaluates exact values only where the
bounds overlap. :func:`knet_lightning.postprocess.merge.panoptic_inference` chooses it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def exact_count_dtype(num_pixels: int) -> torch.dtype:
    """Float dtype whose sums of up to ``num_pixels`` ones are exact integers."""
    return torch.float32 if num_pixels <= 2**24 else torch.float64


# Relative slack on the bounds. An interpolated value is a convex combination of at most
# 16 taps with float32 weights, so it lies within a few ulps (~1e-6 relative) of
# [min, max] of its taps; 1e-5 keeps every decision that is not certain for evaluation.
_BOUND_EPS = 1e-5
# Pair x pixel slots evaluated at once (bounds the temporary memory).
_EVAL_SLOTS = 1 << 22


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


# Long on purpose (the one function over 80 lines here, allowlisted in tests/test_architecture.py):
# a numeric kernel whose steps (axis taps and runs, per-block bounds, settled blocks, thresholded
# areas, the exact evaluation of the unsettled pixels, argmax ties) share some twenty tensors, and
# whose exactness argument (one interpolation formula for every evaluated pixel, torch.argmax's
# first-maximum rule) reads across all of them; the comments mark the steps.
def merge_sparse(
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
            several times a dense one, so noisy outputs are faster dense.

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
    count_dtype = exact_count_dtype(out_h * out_w)
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
