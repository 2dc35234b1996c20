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
from dataclasses import dataclass
from typing import NamedTuple

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


@dataclass(frozen=True)
class _AxisRuns:
    """One axis of the output: the window of stride-4 cells each output index is interpolated
    from (its weights), and the runs of consecutive output indices sharing a window start."""

    size: int  # output length
    weights: Tensor  # (size, span) float32, see _axis_taps
    span: int  # cells per window
    starts: Tensor  # (R,) the distinct window starts
    first: Tensor  # (R,) first output index of each run
    count: Tensor  # (R,) length of each run

    @property
    def num_runs(self) -> int:
        return self.starts.numel()


def _axis_runs(n_out: int, n_img: int, n_pad: int, n_in: int, device: torch.device) -> _AxisRuns:
    start, weights = (t.to(device) for t in _axis_taps(n_out, n_img, n_pad, n_in))
    starts, first, count = _groups(start)
    return _AxisRuns(n_out, weights, weights.shape[1], starts, first, count)


class _Blocks(NamedTuple):
    """What the bounds settle per block of output pixels (a run of rows x a run of columns, B of
    them), for the ``K`` relevant kernels (those that can win somewhere)."""

    top_idx: Tensor  # (B,) the kernel with the best lower bound: the owner where it is settled
    settled: Tensor  # (B,) bool: one kernel alone can win there
    relevant: Tensor  # (K,) kernel indices
    contender: Tensor  # (K, B) bool: kernel k can win somewhere in block b
    surely_in: Tensor  # (K, B) bool: the whole block is at or above the mask threshold
    unsure_thr: Tensor  # (K, B) bool: the threshold test needs exact values


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
    (out_h, out_w), device = output_size, probs.device
    rows = _axis_runs(out_h, image_size[0], padded_size[0], h, probs.device)
    cols = _axis_runs(out_w, image_size[1], padded_size[1], w, probs.device)
    blocks = _settle_blocks(probs, scores, rows, cols, mask_thr)

    # Original areas: blocks wholly above / below the threshold count at once.
    block_pixels = (rows.count[:, None] * cols.count[None, :]).flatten()  # (B,)
    count_dtype = exact_count_dtype(out_h * out_w)
    area_orig = torch.zeros(num_kernels, dtype=torch.long, device=device)
    area_orig[blocks.relevant] = (blocks.surely_in.to(count_dtype) @ block_pixels.to(count_dtype)).round().long()
    # (H, W), exact on settled blocks
    owner = blocks.top_idx.view(rows.num_runs, cols.num_runs)
    owner = owner.repeat_interleave(rows.count, 0).repeat_interleave(cols.count, 1)

    eval_mask = blocks.unsure_thr | (blocks.contender & ~blocks.settled[None])  # (K, B)
    flat_idx = eval_mask.view(-1).nonzero().squeeze(1)
    if flat_idx.numel() == 0:
        return owner, area_orig
    if max_eval_fraction is not None:
        pixels = flat_idx.numel() * int(rows.count.max()) * int(cols.count.max())
        if pixels > max_eval_fraction * num_kernels * out_h * out_w:
            return blocks.relevant
    return _evaluate_unsettled(probs, scores, rows, cols, blocks, flat_idx, owner, area_orig, mask_thr)


def _block_reduce(probs: Tensor, rows: _AxisRuns, cols: _AxisRuns, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``(N, B)``: ``fn``-reduction of each kernel's cells over every block's window (B = R * C blocks)."""
    by_rows = _window_reduce(probs, rows.starts, rows.span, 1, fn)  # (N, R, w)
    return _window_reduce(by_rows, cols.starts, cols.span, 2, fn).flatten(1)


def _settle_blocks(probs: Tensor, scores: Tensor, rows: _AxisRuns, cols: _AxisRuns, mask_thr: float) -> _Blocks:
    """Bounds of every kernel over every block's window of cells, and what they settle."""
    eps, num_kernels = _BOUND_EPS, probs.shape[0]
    pmax, pmin = _block_reduce(probs, rows, cols, torch.maximum), _block_reduce(probs, rows, cols, torch.minimum)

    # Ownership: kernel n can win somewhere in block b unless its upper bound (with slack)
    # is below the best lower bound of the other kernels. Comparing every kernel with the
    # best lower bound overall is the same test: the kernel holding it passes anyway, as
    # its upper bound is at least its lower bound. When it is the only one, it owns the block.
    lower = pmin * scores[:, None]
    top_lower, top_idx = lower.max(dim=0)  # (B,)
    contender = pmax * (scores * ((1 + eps) / (1 - eps)))[:, None] >= top_lower[None]  # (N, B)
    settled = contender.sum(dim=0, dtype=torch.int32) == 1
    # A kernel that contends nowhere owns no pixel, so it is never kept: its area is moot
    # and the threshold work skips it.
    relevant = contender.any(dim=1).nonzero().squeeze(1)  # (K,)
    if relevant.numel() < num_kernels:
        pmin, pmax, contender = pmin[relevant], pmax[relevant], contender[relevant]
    surely_in = pmin >= mask_thr / (1 - eps)  # (K, B)
    unsure_thr = (pmax >= mask_thr / (1 + eps)) & ~surely_in
    return _Blocks(top_idx, settled, relevant, contender, surely_in, unsure_thr)


def _evaluate_unsettled(
    probs: Tensor,
    scores: Tensor,
    rows: _AxisRuns,
    cols: _AxisRuns,
    blocks: _Blocks,
    flat_idx: Tensor,
    owner: Tensor,
    area_orig: Tensor,
    mask_thr: float,
) -> tuple[Tensor, Tensor]:
    """Exact values where the bounds left a (kernel, block) pair open (``flat_idx`` into the
    ``(K, B)`` pairs): the threshold count of its pixels into ``area_orig`` and, where the
    kernel contends, its ``score * prob`` into the owner of each pixel (first kernel on ties)."""
    device, num_kernels = probs.device, probs.shape[0]
    out_h, out_w = rows.size, cols.size
    ky, kx = rows.span, cols.span
    num_blocks = blocks.contender.shape[1]
    max_rows, max_cols = int(rows.count.max()), int(cols.count.max())
    kernel_idx, block_idx = blocks.relevant[flat_idx // num_blocks], flat_idx % num_blocks
    contends = blocks.contender.view(-1)[flat_idx]
    counts_thr = blocks.unsure_thr.view(-1)[flat_idx]
    # Per run of rows (columns): its output indices, their validity and their weights.
    ly, lx = torch.arange(max_rows, device=device), torch.arange(max_cols, device=device)
    run_rows = (rows.first[:, None] + ly).clamp(max=out_h - 1)  # (R, MR)
    run_cols = (cols.first[:, None] + lx).clamp(max=out_w - 1)  # (C, MC)
    run_row_ok, run_col_ok = ly < rows.count[:, None], lx < cols.count[:, None]
    run_wy, run_wx = rows.weights[run_rows], cols.weights[run_cols]  # (R, MR, Ky), (C, MC, Kx)
    win_y = rows.starts[:, None] + torch.arange(ky, device=device)  # (R, Ky) cell rows of each run
    win_x = cols.starts[:, None] + torch.arange(kx, device=device)  # (C, Kx)

    best = torch.full((out_h * out_w,), float("-inf"), device=device)
    evaluated: list[tuple[Tensor, Tensor, Tensor]] = []  # (pixel, score * prob, kernel)
    step = max(1, _EVAL_SLOTS // (max_rows * max_cols))
    for lo in range(0, block_idx.numel(), step):
        b, n = block_idx[lo : lo + step], kernel_idx[lo : lo + step]
        gr, gc = b // cols.num_runs, b % cols.num_runs
        cells = probs[n[:, None, None], win_y[gr][:, :, None], win_x[gc][:, None, :]]  # (P, Ky, Kx)
        val = _interpolate(cells, run_wy[gr], run_wx[gc])  # (P, MR, MC)
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


def _interpolate(cells: Tensor, wyp: Tensor, wxp: Tensor) -> Tensor:
    """``(P, MR, MC)`` interpolated values of ``cells (P, Ky, Kx)`` with the row weights ``wyp
    (P, MR, Ky)`` and column weights ``wxp (P, MC, Kx)``. One formula for every pixel,
    ``sum_a wy[y, a] * sum_c wx[x, c] * p[a, c]``, so a value does not depend on which other
    pixels are evaluated with it."""
    ky, kx = cells.shape[1], cells.shape[2]
    val = None
    for a in range(ky):
        inner = wxp[:, :, 0] * cells[:, a, 0, None]
        for c in range(1, kx):
            inner = inner + wxp[:, :, c] * cells[:, a, c, None]  # (P, MC)
        term = wyp[:, :, a, None] * inner[:, None, :]  # (P, MR, MC)
        val = term if val is None else val + term
    assert val is not None
    return val
