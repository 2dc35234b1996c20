"""Deformable convolution (DCNv1) with its own offset conv, as mmcv's ``DeformConv2dPack``: the 3x3
convs of the DCN stages of :class:`~knet_lightning.models.resnet.ResNetBackbone`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

__all__ = ["DeformConv2dPack", "sampled_deform_conv2d"]


def sampled_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """DCNv1 as bilinear sampling (``F.grid_sample``) + one matmul: torchvision's ``deform_conv2d``
    without bias or mask, for the CPU, where torchvision's kernel is the bulk of a DCN model's time.

    Every kernel tap's sampling position ``p0 * stride - padding + p_k * dilation + Δp_k`` is
    sampled bilinearly with zeros outside the image (``padding_mode="zeros"``, ``align_corners=True``:
    grid -1 and 1 are the centres of the first and last pixels), giving the ``(B, C_in * kh * kw,
    H_out * W_out)`` columns that the weight multiplies. Measured on 2 cores (R101-DCN's 3x3 convs
    at 512x512, c3 to c5): forward 2.2-4.2x and forward + backward 5.7-7.0x faster than
    torchvision's (``scripts/bench_dcn.py``).

    Args:
        x: ``(B, C_in, H, W)``, H and W at least 2.
        offset: ``(B, 2 * G * kh * kw, H_out, W_out)`` in torchvision's layout (``(dy, dx)`` per tap).
        weight: ``(C_out, C_in, kh, kw)``.
    """
    b, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    taps = kh * kw
    groups = offset.shape[1] // (2 * taps)
    h_out, w_out = offset.shape[-2:]
    off = offset.view(b, groups, taps, 2, h_out, w_out)
    dtype, device = x.dtype, x.device
    rows = torch.arange(h_out, device=device, dtype=dtype) * stride[0] - padding[0]
    cols = torch.arange(w_out, device=device, dtype=dtype) * stride[1] - padding[1]
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dilation[0]).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dilation[1]).repeat(kh)
    y = rows[None, :, None] + tap_y[:, None, None] + off[:, :, :, 0]  # (B, G, taps, H_out, W_out)
    xx = cols[None, None, :] + tap_x[:, None, None] + off[:, :, :, 1]
    grid = torch.stack((xx * (2.0 / (w - 1)) - 1.0, y * (2.0 / (h - 1)) - 1.0), dim=-1)
    # grid_sample's CPU kernel splits its work over the batch only, so one image would run on one
    # thread: each tap gets its own "image", a stride-0 view of the same input (no copy), which
    # makes B * G * taps work items (R101-DCN's strided c3 conv: forward 1.6x faster on 2 threads,
    # scripts/bench_dcn.py).
    source = x.reshape(b * groups, 1, c // groups, h, w).expand(-1, taps, -1, -1, -1)
    sampled = F.grid_sample(
        source.reshape(b * groups * taps, c // groups, h, w), grid.view(b * groups * taps, h_out, w_out, 2),
        mode="bilinear", padding_mode="zeros", align_corners=True,
    )  # fmt: skip  # (B * G * taps, C_in / G, H_out, W_out): the columns in (group, tap, channel) order
    columns = sampled.view(b, taps * c, h_out * w_out)
    weight = weight.reshape(c_out, groups, c // groups, taps).transpose(2, 3).reshape(c_out, taps * c)
    return (weight @ columns).view(b, c_out, h_out, w_out)


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
            weight = self.weight.to(compute)
            if xc.device.type == "cpu" and min(xc.shape[-2:]) >= 2:
                out = sampled_deform_conv2d(xc, offset, weight, self.stride, self.padding, self.dilation)
            else:  # CUDA: torchvision's kernel (not measured against the sampling there yet)
                out = deform_conv2d(
                    xc, offset, weight, stride=self.stride, padding=self.padding, dilation=self.dilation
                )
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, deform_groups={self.deform_groups}, bias=False"
        )
