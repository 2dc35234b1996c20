"""Semantic-FPN localization neck (official ``SemanticFPNWrapper``) and the 2-D sine positional encoding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SinePositionalEncoding(nn.Module):
    """DETR / mmdet 2-D sine positional encoding with an all-valid mask.

    Channel layout follows mmdet: the first ``num_feats`` channels encode y, the last
    ``num_feats`` encode x, each interleaved ``sin(f0), cos(f0), sin(f1), cos(f1), ...``
    with frequencies ``temperature ** (2 * (i // 2) / num_feats)``. Positions are 1..H
    (1..W) normalized to ``(0, scale]``.
    """

    def __init__(
        self,
        num_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if num_feats % 2 != 0:
            raise ValueError(f"SinePositionalEncoding num_feats must be even, got {num_feats}")
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, *, H, W)`` -> encoding ``(B, 2 * num_feats, H, W)`` in ``x``'s dtype."""
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        device = x.device
        y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=device)
        x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=device)
        if self.normalize:
            y_embed = y_embed / (h + self.eps) * self.scale
            x_embed = x_embed / (w + self.eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)
        pos_y = y_embed[:, None] / dim_t  # (H, F)
        pos_x = x_embed[:, None] / dim_t  # (W, F)
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat(
            (
                pos_y.t()[:, :, None].expand(self.num_feats, h, w),
                pos_x.t()[:, None, :].expand(self.num_feats, h, w),
            ),
            dim=0,
        )
        return pos[None].expand(b, -1, -1, -1).to(x.dtype)


def conv_gn_relu(
    in_channels: int, out_channels: int, kernel_size: int, num_groups: int, stride: int = 1
) -> nn.Sequential:
    """mmcv ``ConvModule(norm_cfg=GN)``: conv without bias (the norm has one) -> GroupNorm -> ReLU."""
    if out_channels % num_groups != 0:
        raise ValueError(f"GroupNorm num_groups={num_groups} must divide the channel count {out_channels}")
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(num_groups, out_channels),
        nn.ReLU(inplace=True),
    )


class _Upsample2x(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class SemanticFPNNeck(nn.Module):
    """Fuses P2..P5 into one stride-8 map and returns the localization and semantic features.

    Per level (all convs 3x3, no bias, GN, ReLU): P2 one stride-2 conv; P3 one conv;
    P4 conv -> x2 -> conv; P5 (+ sine positional encoding) conv -> x2 -> conv -> x2 -> conv.
    The four stride-8 maps are summed; ``conv_pred`` and ``aux_conv`` (1x1 conv-GN-ReLU)
    give the localization and semantic features. Convs init N(0, 0.01) as the official code.

    Args:
        in_channels: FPN channels.
        channels: feature channels of every conv (official: 256).
        num_groups: GroupNorm groups (official: 32).
        num_levels: number of FPN levels, starting at stride 4 (official: 4, P2..P5).
    """

    def __init__(self, in_channels: int = 256, channels: int = 256, num_groups: int = 32, num_levels: int = 4) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"SemanticFPNNeck needs at least 2 levels (P2, P3), got {num_levels}")
        if in_channels % 2 != 0:
            raise ValueError(f"SemanticFPNNeck in_channels must be even for the PE, got {in_channels}")
        self.positional_encoding = SinePositionalEncoding(num_feats=in_channels // 2)
        self.convs_all_levels = nn.ModuleList()
        self.convs_all_levels.append(nn.Sequential(conv_gn_relu(in_channels, channels, 3, num_groups, stride=2)))
        for level in range(1, num_levels):
            layers: list[nn.Module] = []
            for j in range(level):
                layers.append(conv_gn_relu(in_channels if j == 0 else channels, channels, 3, num_groups))
                if j < level - 1:
                    layers.append(_Upsample2x())
            self.convs_all_levels.append(nn.Sequential(*layers))
        self.conv_pred = conv_gn_relu(channels, channels, 1, num_groups)
        self.aux_conv = conv_gn_relu(channels, channels, 1, num_groups)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``[P2..P5]`` -> ``(localization (B, C, H/8, W/8), semantic (B, C, H/8, W/8))``."""
        if len(feats) != len(self.convs_all_levels):
            raise ValueError(f"SemanticFPNNeck expects {len(self.convs_all_levels)} FPN levels, got {len(feats)}")
        last = len(feats) - 1
        fused: Tensor | None = None
        for i, (convs, p) in enumerate(zip(self.convs_all_levels, feats)):
            if i == last:
                # Coarsest level carries the position cue (paper Table 4b: PE instead of CoordConv).
                p = p + self.positional_encoding(p)
            out = convs(p)
            fused = out if fused is None else fused + out
        assert fused is not None
        return self.conv_pred(fused), self.aux_conv(fused)
