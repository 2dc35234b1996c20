"""The building blocks of the Swin Transformer backbone (:class:`~knet_lightning.models.swin.SwinBackbone`).

torchvision's ``SwinTransformerBlock`` (pre-norm window attention and MLP with stochastic depth)
with two parts of ours, both so that the published K-Net Swin models (MMDetection's and
MMSegmentation's ``SwinTransformer``) give their numbers:

- the window attention's forward (:class:`WindowAttention`): torchvision's
  ``shifted_window_attention`` drops the shift when one window covers the padded map,
  OpenMMLab's ``ShiftWindowMSA`` keeps it; the two differ on small maps (a 224x224 input's
  last stage);
- :class:`PatchMerging`, which concatenates the 2x2 neighbours in ``nn.Unfold``'s channel
  order, as OpenMMLab's does (see :mod:`knet_lightning.models.swin`).

Also the 4x4 patch embedding (:class:`PatchEmbed`) and a stage of blocks (:class:`SwinStage`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformerBlock

__all__ = ["PatchEmbed", "PatchMerging", "SwinStage", "WindowAttention"]

# Masked-out window-attention logits. The references add -100, whose softmax weight (about
# e^-100 = 3.7e-44) is a subnormal float: every product with it, and the outputs of query rows
# that see only masked keys (the padding's), are subnormal too, and x86 GEMM kernels run 10-100x
# slower on such inputs (Swin-L at 512x512 on 2 cores: 2.67 s with -100, 1.71 s with this value,
# scripts/profile_swin_l.py, while the output projection still read the padding's rows; it no
# longer does). exp(-10000) is exactly 0; the weights it replaces were below fp32's resolution
# of any unmasked sum, so the outputs are bit-identical (tests/test_swin.py).
_MASKED = -1.0e4


def _shift_region_ids(size: int, window: int, shift: int, device: torch.device) -> Tensor:
    """``(size,)`` region of each position of a cyclically shifted axis: 0 for the positions that
    were neighbours before the shift, 1 and 2 for the two strips that wrapped around."""
    ids = torch.zeros(size, dtype=torch.long, device=device)
    ids[size - window : size - shift] = 1
    ids[size - shift :] = 2
    return ids


def _partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """``(B, H, W, C)`` -> ``(B, nW, wh*ww, C)`` windows in row-major order."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


class WindowAttention(ShiftedWindowAttention):
    """Multi-head self-attention inside (shifted) windows with relative position bias.

    torchvision's module (parameters ``qkv``, ``proj``, ``relative_position_bias_table``) with
    the forward of the official K-Net Swin (MMDetection / MMSegmentation ``ShiftWindowMSA``):
    pad right/bottom to a multiple of the window, roll by ``-shift`` whenever ``shift > 0``
    (even when one window covers the map), mask attention between positions that were not
    neighbours before the roll (-100 there, -1e4 here: see ``_MASKED``), roll back, crop; the
    padding's tokens hold ``qkv(0)`` and are never projected out. The index buffer is not saved:
    it is a function of the window size, and published checkpoints that carry it are read
    without it.
    """

    def define_relative_position_index(self) -> None:
        super().define_relative_position_index()
        index = self.relative_position_index
        del self._buffers["relative_position_index"]
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        b, h, w, c = x.shape
        wh, ww = self.window_size
        sh, sw = self.shift_size
        shifted = sh > 0 or sw > 0
        index = _window_index(h, w, (wh, ww), (sh, sw) if shifted else (0, 0), x.device)
        heads = self.num_heads
        # The projections act per token, so q, k, v are computed on the map's own tokens and then
        # padded, rolled and partitioned as one gather; the output projection runs after the
        # inverse gather. Neither runs on the padding, which is up to 20% of the tokens of
        # Swin-L's third stage and 72% of its last at 512x512 (window 7). A padding slot holds
        # qkv(0) = the bias, what the reference's zero padding gives; outputs are bit-identical.
        qkv = self.qkv(x.reshape(b, h * w, c)).index_select(1, index.gather)
        if index.pad_slots.numel():
            qkv[:, index.pad_slots] = self.qkv.bias.to(qkv.dtype) if self.qkv.bias is not None else 0.0
        n_win, n = index.num_windows, wh * ww
        q, k, v = (
            qkv.view(b, n_win, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5).unbind(0)
        )  # (B, nW, heads, N, d)
        bias = self.get_relative_position_bias()  # (1, heads, N, N)
        # the reference's op order (scale q, q k^T, add bias, then mask, softmax), so that the
        # published weights give the published model's numbers to fp32 rounding; windows of
        # 7x7 gain nothing from a fused kernel here (scaled_dot_product_attention with bias and
        # mask as one additive mask: Swin-L's attention at 512x512 on 2 CPU cores no faster)
        attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
        attn = attn.add_(bias.to(q.dtype))  # in place: the (B, nW, heads, N, N) logits are allocated once
        if shifted:
            attn = attn.add_(index.mask[:, None].to(q.dtype))
        attn = F.dropout(attn.softmax(dim=-1), p=self.attention_dropout, training=self.training)
        # window merge, roll back and crop as one gather, then the output projection
        out = (attn @ v).transpose(2, 3).reshape(b, n_win * n, c).index_select(1, index.scatter)
        return F.dropout(self.proj(out), p=self.dropout, training=self.training).view(b, h, w, c)


class _WindowIndex(NamedTuple):
    """Where each window slot reads from the ``(H, W)`` map and where each position is written back."""

    gather: Tensor  # (nW*N,) flat position of every window slot (0 for padding slots)
    pad_slots: Tensor  # the slots that hold padding (zeros)
    scatter: Tensor  # (H*W,) the slot of every position
    num_windows: int
    mask: Tensor | None  # (nW, N, N) _MASKED between slots from different regions of a shifted map


@functools.lru_cache(maxsize=64)
def _window_index(
    h: int, w: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> _WindowIndex:
    """The index of OpenMMLab's ``ShiftWindowMSA`` data movement for an ``(h, w)`` map: pad right and
    bottom to a multiple of the window, roll by ``-shift``, partition into row-major windows (and
    the inverse), computed once per size on the index grid instead of on the features. Built
    outside inference mode, so that an index cached during an evaluation serves training too
    (autograd cannot save inference tensors)."""
    with torch.inference_mode(False):
        return _build_window_index(h, w, window, shift, device)


def _build_window_index(
    h: int, w: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> _WindowIndex:
    wh, ww = window
    sh, sw = shift
    hp, wp = h + (-h) % wh, w + (-w) % ww
    rows, cols = torch.arange(hp, device=device), torch.arange(wp, device=device)
    inside = (rows[:, None] < h) & (cols[None] < w)
    grid = torch.where(inside, rows[:, None] * w + cols[None], -1)  # (hp, wp), -1: padding
    mask = None
    if sh > 0 or sw > 0:
        grid = torch.roll(grid, shifts=(-sh, -sw), dims=(0, 1))
        region = _shift_region_ids(hp, wh, sh, device)[:, None] * 3 + _shift_region_ids(wp, ww, sw, device)[None]
        region = _partition(region[None, :, :, None], (wh, ww))[0, :, :, 0]  # (nW, N)
        mask = (region[:, :, None] != region[:, None, :]).float() * _MASKED
    slots = _partition(grid[None, :, :, None], (wh, ww)).reshape(-1)  # (nW*N,) window-major
    pad_slots = (slots < 0).nonzero().squeeze(1)
    scatter = torch.empty(h * w, dtype=torch.long, device=device)
    real = slots >= 0
    scatter[slots[real]] = torch.arange(slots.numel(), device=device)[real]
    return _WindowIndex(slots.clamp(min=0), pad_slots, scatter, (hp // wh) * (wp // ww), mask)


class PatchEmbed(nn.Module):
    """4x4 stride-4 conv + LayerNorm; pads the right and bottom to a multiple of the patch.

    ``(B, 3, H, W)`` -> ``(B, ceil(H/4), ceil(W/4), C)``.
    """

    def __init__(self, embed_dims: int, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dims, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, images: Tensor) -> Tensor:
        p = self.patch_size
        h, w = images.shape[-2:]
        images = F.pad(images, (0, (-w) % p, 0, (-h) % p))
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated in ``nn.Unfold`` order, LayerNorm, then a linear 4C -> 2C.

    ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``; odd sizes are zero-padded at the
    bottom and right. Channel ``c * 4 + 2 * row + col`` holds channel ``c`` of neighbour
    ``(row, col)``, as OpenMMLab's ``PatchMerging`` (an ``nn.Unfold`` with a 2x2 kernel) orders them.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        x = x.view(b, h2, 2, w2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(b, h2, w2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` Swin blocks, alternating regular and shifted windows, then an optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: Sequence[float],
        mlp_ratio: float,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size=[window_size, window_size],
                shift_size=[0 if j % 2 == 0 else window_size // 2] * 2,
                mlp_ratio=mlp_ratio,
                stochastic_depth_prob=drop_path[j],
                attn_layer=WindowAttention,
            )
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, H, W, C)`` -> (stage output ``(B, H, W, C)``, next stage's input ``(B, H/2, W/2, 2C)``)."""
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)
