"""Deformable convolution (DCNv1) with its own offset conv, as mmcv's ``DeformConv2dPack``: the 3x3
convs of the DCN stages of :class:`~knet_lightning.models.resnet.ResNetBackbone`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

__all__ = ["DeformConv2dPack"]


class DeformConv2dPack(nn.Module):
    """Deformable convolution (DCNv1) that predicts its own offsets, mmcv ``DeformConv2dPack``.

    Dai et al., "Deformable Convolutional Networks", ICCV 2017: each kernel tap ``k`` of
    output pixel ``p0`` samples the input bilinearly at ``p0 * stride - padding +
    p_k * dilation + Δp_k`` (zero outside the image), with the offsets ``Δp`` given by a
    plain conv over the same input (``conv_offset``). Offset layout, as mmcv
    (``mmcv/ops/deform_conv.py``) and torchvision's ``deform_conv2d``: ``(B, 2 * deform_groups
    * kh * kw, H_out, W_out)``, channel ``2k`` the row (y) and ``2k + 1`` the column (x) offset
    of tap ``k = i * kw + j`` in group-major order. No bias, no modulation mask (that is DCNv2).

    Parameter names are mmcv's (``weight``, ``conv_offset.weight``, ``conv_offset.bias``), so
    official mmdet DCN checkpoints load by name. ``conv_offset`` starts at zero, so a fresh
    module equals a plain ``nn.Conv2d(..., bias=False)`` holding ``weight``.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        kernel_size: ``kh, kw`` (an int for a square kernel).
        stride, padding, dilation: as ``nn.Conv2d``; shared by the offset conv, so the offsets
            are predicted on the output grid.
        deform_groups: channel groups with their own offsets (``C_in`` must divide by it).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        deform_groups: int = 1,
    ) -> None:
        super().__init__()
        if deform_groups < 1 or in_channels % deform_groups:
            raise ValueError(
                f"DeformConv2dPack: in_channels={in_channels} must be divisible by deform_groups={deform_groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.deform_groups = deform_groups
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.conv_offset = nn.Conv2d(
            in_channels,
            deform_groups * 2 * kh * kw,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's default
        self.init_offset()

    def init_offset(self) -> None:
        """Zero the offset conv (weight and bias): sampling starts on the regular grid."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``, sizes as ``nn.Conv2d``'s."""
        # torchvision's CPU kernel has no bfloat16 (and no CPU autocast rule: under autocast it
        # fails on mixed dtypes), and half-precision offsets would round the sampling positions
        # (bf16 keeps 8 bits: a 20 px offset is off by 0.06 px); so below fp32 the whole op,
        # offset conv included, runs in fp32 with autocast off, and the result is cast back to
        # the input's dtype, as an autocast conv would return.
        compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(compute)
            if self.conv_offset.weight.dtype == compute:
                offset = self.conv_offset(xc)  # (B, 2 * deform_groups * kh * kw, H_out, W_out)
            else:  # parameters cast to half precision (e.g. Lightning's "bf16-true")
                offset = F.conv2d(
                    xc,
                    self.conv_offset.weight.to(compute),
                    self.conv_offset.bias.to(compute),
                    self.stride,
                    self.padding,
                    self.dilation,
                )
            out = deform_conv2d(
                xc, offset, self.weight.to(compute), stride=self.stride, padding=self.padding, dilation=self.dilation
            )
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, deform_groups={self.deform_groups}, bias=False"
        )
