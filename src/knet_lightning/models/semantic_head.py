"""Decode heads for the semantic task that expose their class kernels (paper §3.4; the official
``knet/seg/seg_kernel_head.py``).

K-Net's semantic variant starts from an ordinary mmseg decode head ("kernel generate
head"). Besides its logits it hands over the feature map ``F`` it classifies (before
dropout) and the weight of its final 1x1 classifier ``conv_seg`` as one initial kernel
per class. The kernel update heads then refine these class kernels against ``F``.

Heads here follow mmseg: ``FCNHead`` (3x3 conv-BN-ReLU stack, optional concat with the
input), ``PSPHead`` (pyramid pooling), ``ASPPHead`` (atrous spatial pyramid pooling) and
``UPerHead`` (pyramid pooling on C5 plus FPN-style fusion at stride 4), with ``Dropout2d``
before ``conv_seg``. Convs are initialised like mmcv's ``ConvModule``
(Kaiming normal, fan-out, norm weight 1 / bias 0) and ``conv_seg`` ~ N(0, 0.01), bias 0.
BN defaults to ``nn.BatchNorm2d``; SyncBN is the trainer's ``sync_batchnorm`` business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]

__all__ = [
    "ASPPHead", "AdaptiveAvgPool2d", "ConvBNReLU", "DecodeHeadOutput", "FCNHead", "PPM", "PSPHead", "UPerHead",
]  # fmt: skip


# torch.export's flag (PyTorch >= 2.6; older versions have no dynamo ONNX export to serve)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _pool_matrix(size: Tensor | int, bins: int, like: Tensor) -> Tensor:
    """``(bins, size)`` averaging weights of ``adaptive_avg_pool`` along one axis: bin i averages
    ``[floor(i * size / bins), ceil((i + 1) * size / bins))``, PyTorch's definition."""
    index = torch.arange(bins, device=like.device)
    start = torch.div(index * size, bins, rounding_mode="floor")
    end = torch.div((index + 1) * size + bins - 1, bins, rounding_mode="floor")
    pos = torch.arange(size, device=like.device)[None]
    inside = (pos >= start[:, None]) & (pos < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` with a square integer output that ONNX export can trace at any
    input size.

    ONNX has no adaptive pooling: the TorchScript exporter refuses one whose input size is not
    static, and the dynamo exporter's decomposition bakes the example's bin boundaries in. While
    exporting (and only then: eager results stay PyTorch's own kernel, bit for bit) the pool is
    two matmuls with averaging matrices built from the runtime size,
    ``P_h (bins, h) @ x (B, C, h, w) @ P_w^T (w, bins)``, equal up to float rounding.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.onnx.is_in_onnx_export() or _is_exporting()):
            return super().forward(x)
        bins = int(self.output_size if isinstance(self.output_size, int) else self.output_size[0])
        h, w = x.shape[-2:]
        return _pool_matrix(h, bins, x) @ x @ _pool_matrix(w, bins, x).transpose(0, 1)


class DecodeHeadOutput(NamedTuple):
    """What a kernel-generating decode head returns.

    Attributes:
        logits: ``(B, num_classes, h, w)`` class logits (``conv_seg`` with bias, after dropout).
        feature: ``(B, C, h, w)`` the feature map ``F`` fed to ``conv_seg``, before dropout.
        kernels: ``(num_classes, C)`` ``conv_seg.weight`` as one kernel per class (no bias);
            shares storage and gradient with the classifier.
    """

    logits: Tensor
    feature: Tensor
    kernels: Tensor


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) → norm → ReLU, i.e. mmcv ``ConvModule`` with norm and ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=padding,
                dilation=dilation,
                bias=False,
            ),
            norm_layer(out_channels),
            # Not in-place: UPerHead adds laterals into tensors that autograd still needs.
            nn.ReLU(inplace=False),
        )
        conv = self[0]
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        norm = self[1]
        if getattr(norm, "weight", None) is not None:
            nn.init.ones_(norm.weight)
        if getattr(norm, "bias", None) is not None:
            nn.init.zeros_(norm.bias)


class _ClassifierMixin(nn.Module):
    """``Dropout2d`` + 1x1 ``conv_seg`` shared by every decode head (mmseg ``cls_seg``)."""

    num_classes: int
    channels: int

    def _build_classifier(self, channels: int, num_classes: int, dropout: float) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.channels = channels
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def _classify(self, feature: Tensor) -> DecodeHeadOutput:
        logits = self.conv_seg(self.dropout(feature))
        kernels = self.conv_seg.weight.reshape(self.num_classes, self.channels)
        return DecodeHeadOutput(logits, feature, kernels)


def _check_features(features: Sequence[Tensor], index: int, in_channels: int, head: str) -> Tensor:
    if not 0 <= index < len(features) and not -len(features) <= index < 0:
        raise ValueError(f"{head}: in_index={index} is out of range for {len(features)} backbone features")
    x = features[index]
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"{head}: expected backbone feature {index} of shape (B, {in_channels}, h, w), got {tuple(x.shape)}"
        )
    return x


class FCNHead(_ClassifierMixin):
    """mmseg ``FCNHead``: ``num_convs`` 3x3 conv-BN-ReLU, optionally concat with the input.

    Args:
        in_channels: channels of the selected backbone level (2048 for C5 of R-50).
        channels: width of the convs and of ``F`` (512 for the K-Net+FCN decode head,
            256 for the auxiliary head).
        num_classes: number of classes (= number of class kernels).
        num_convs: number of 3x3 conv-BN-ReLU layers; 0 means ``F`` is the input itself,
            which then requires ``in_channels == channels``.
        concat_input: concatenate the input with the conv output and fuse it with one
            more 3x3 conv-BN-ReLU (``conv_cat``).
        dropout: ``Dropout2d`` rate before ``conv_seg``.
        in_index: which backbone level ``forward`` reads (3 = C5, 2 = C4 for the aux head).
        dilation: dilation of the 3x3 convs.
        norm_layer: norm constructor, ``nn.BatchNorm2d`` by default.
    """

    def __init__(
        self,
        in_channels: int = 2048,
        channels: int = 512,
        num_classes: int = 150,
        num_convs: int = 2,
        concat_input: bool = True,
        dropout: float = 0.1,
        in_index: int = 3,
        dilation: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if num_convs < 0:
            raise ValueError(f"FCNHead: num_convs must be >= 0, got {num_convs}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"FCNHead: num_convs=0 needs in_channels == channels, got {in_channels} != {channels}")
        self.in_channels = in_channels
        self.in_index = in_index
        self.concat_input = concat_input
        padding = dilation
        convs = [
            ConvBNReLU(
                in_channels if i == 0 else channels,
                channels,
                3,
                padding=padding,
                dilation=dilation,
                norm_layer=norm_layer,
            )
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.conv_cat = (
            ConvBNReLU(in_channels + channels, channels, 3, padding=1, norm_layer=norm_layer) if concat_input else None
        )
        self._build_classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[Tensor]) -> DecodeHeadOutput:
        """Args:
            features: backbone levels ``[C2, C3, C4, C5]``, each ``(B, C_i, h_i, w_i)``.

        Returns:
            logits ``(B, num_classes, h, w)``, ``F`` ``(B, channels, h, w)`` and kernels
            ``(num_classes, channels)``, at the resolution of level ``in_index``.
        """
        x = _check_features(features, self.in_index, self.in_channels, "FCNHead")
        feature = self.convs(x)
        if self.conv_cat is not None:
            feature = self.conv_cat(torch.cat([x, feature], dim=1))
        return self._classify(feature)


class PPM(nn.ModuleList):
    """Pyramid pooling module: adaptive average pool to each scale, 1x1 conv-BN-ReLU, upsample.

    With plain ``BatchNorm2d`` in training, the 1x1-pooled branch sees one value per channel
    per image, so a batch of one image fails; SyncBN over several GPUs does not.
    """

    def __init__(
        self,
        pool_scales: Sequence[int],
        in_channels: int,
        channels: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__(
            nn.Sequential(
                AdaptiveAvgPool2d(scale),
                ConvBNReLU(in_channels, channels, 1, norm_layer=norm_layer),
            )
            for scale in pool_scales
        )
        self.pool_scales = tuple(pool_scales)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, in_channels, h, w)`` -> one ``(B, channels, h, w)`` map per pool scale."""
        if self.training and x.shape[0] == 1 and 1 in self.pool_scales:
            for module in self.modules():
                if type(module) is nn.BatchNorm2d:
                    raise ValueError(
                        "UPerHead/PPM: pool scale 1 with nn.BatchNorm2d cannot train on a "
                        "batch of 1 image (one value per channel); use batch size >= 2, "
                        "SyncBN across devices, or drop scale 1 from pool_scales"
                    )
        return [F.interpolate(branch(x), size=x.shape[-2:], mode="bilinear", align_corners=False) for branch in self]


class UPerHead(_ClassifierMixin):
    """mmseg ``UPerHead`` (UPerNet): PPM on the top level plus an FPN fused at stride 4.

    The original K-Net repo (``UPerKernelHead``, which produced the README numbers) uses
    ``channels=256``; mmseg's later port of the config uses 512. Both work here.

    Args:
        in_channels: channels of ``[C2, C3, C4, C5]``.
        channels: width of every conv and of ``F``.
        num_classes: number of classes.
        pool_scales: PPM output sizes.
        dropout: ``Dropout2d`` rate before ``conv_seg``.
        norm_layer: norm constructor.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (256, 512, 1024, 2048),
        channels: int = 256,
        num_classes: int = 150,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        in_channels = tuple(int(c) for c in in_channels)
        if len(in_channels) < 2:
            raise ValueError(f"UPerHead: need >= 2 input levels, got in_channels={in_channels}")
        if len(pool_scales) == 0:
            raise ValueError("UPerHead: pool_scales must not be empty")
        self.in_channels = in_channels
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, norm_layer)
        self.bottleneck = ConvBNReLU(
            in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1, norm_layer=norm_layer
        )
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1, norm_layer=norm_layer) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            ConvBNReLU(channels, channels, 3, padding=1, norm_layer=norm_layer) for _ in in_channels[:-1]
        )
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3, padding=1, norm_layer=norm_layer)
        self._build_classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[Tensor]) -> DecodeHeadOutput:
        """Args:
            features: ``[C2, C3, C4, C5]``, ``(B, in_channels[i], h_i, w_i)``.

        Returns:
            logits ``(B, num_classes, h0, w0)``, ``F`` ``(B, channels, h0, w0)`` and kernels
            ``(num_classes, channels)`` at the resolution of the first level (stride 4).
        """
        if len(features) != len(self.in_channels):
            raise ValueError(f"UPerHead: expected {len(self.in_channels)} backbone features, got {len(features)}")
        inputs = [_check_features(features, i, c, "UPerHead") for i, c in enumerate(self.in_channels)]
        top = inputs[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        # Top-down path; out-of-place adds keep autograd happy.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        feature = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return self._classify(feature)


class PSPHead(_ClassifierMixin):
    """mmseg ``PSPHead`` (PSPNet): PPM on one level, concatenated with it and fused by a 3x3 conv.

    Args:
        in_channels: channels of the selected level (2048 for C5 of R-50).
        channels: width of the PPM branches and of ``F`` (512 in the K-Net config).
        num_classes: number of classes.
        pool_scales: PPM output sizes.
        dropout: ``Dropout2d`` rate before ``conv_seg``.
        in_index: which backbone level ``forward`` reads.
        norm_layer: norm constructor.
    """

    def __init__(
        self,
        in_channels: int = 2048,
        channels: int = 512,
        num_classes: int = 150,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        in_index: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if len(pool_scales) == 0:
            raise ValueError("PSPHead: pool_scales must not be empty")
        self.in_channels = in_channels
        self.in_index = in_index
        self.psp_modules = PPM(pool_scales, in_channels, channels, norm_layer)
        self.bottleneck = ConvBNReLU(
            in_channels + len(pool_scales) * channels, channels, 3, padding=1, norm_layer=norm_layer
        )
        self._build_classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[Tensor]) -> DecodeHeadOutput:
        """``[C2..C5]`` -> logits ``(B, num_classes, h, w)``, ``F`` ``(B, channels, h, w)`` and
        kernels ``(num_classes, channels)`` at the resolution of level ``in_index``."""
        x = _check_features(features, self.in_index, self.in_channels, "PSPHead")
        return self._classify(self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1)))


class ASPPHead(_ClassifierMixin):
    """mmseg ``ASPPHead`` (DeepLabV3): image pooling plus parallel atrous convs, fused by a 3x3 conv.

    Each dilation d gives a conv-BN-ReLU branch, 1x1 for d = 1 and 3x3 with dilation d otherwise;
    the image-pooling branch (global average pool, 1x1 conv-BN-ReLU, bilinear upsample) comes
    first in the concatenation, as in mmseg.

    Args:
        in_channels: channels of the selected level (2048 for C5 of R-50).
        channels: width of every branch and of ``F`` (512 in the K-Net config).
        num_classes: number of classes.
        dilations: one branch per dilation ((1, 12, 24, 36) in the K-Net config).
        dropout: ``Dropout2d`` rate before ``conv_seg``.
        in_index: which backbone level ``forward`` reads.
        norm_layer: norm constructor.
    """

    def __init__(
        self,
        in_channels: int = 2048,
        channels: int = 512,
        num_classes: int = 150,
        dilations: Sequence[int] = (1, 12, 24, 36),
        dropout: float = 0.1,
        in_index: int = 3,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if len(dilations) == 0:
            raise ValueError("ASPPHead: dilations must not be empty")
        self.in_channels = in_channels
        self.in_index = in_index
        self.image_pool = nn.Sequential(
            AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, 1, norm_layer=norm_layer)
        )
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(
                in_channels,
                channels,
                1 if d == 1 else 3,
                padding=0 if d == 1 else d,
                dilation=d,
                norm_layer=norm_layer,
            )
            for d in dilations
        )
        self.bottleneck = ConvBNReLU((len(dilations) + 1) * channels, channels, 3, padding=1, norm_layer=norm_layer)
        self._build_classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[Tensor]) -> DecodeHeadOutput:
        """``[C2..C5]`` -> logits ``(B, num_classes, h, w)``, ``F`` ``(B, channels, h, w)`` and
        kernels ``(num_classes, channels)`` at the resolution of level ``in_index``."""
        x = _check_features(features, self.in_index, self.in_channels, "ASPPHead")
        if self.training and x.shape[0] == 1 and type(self.image_pool[1][1]) is nn.BatchNorm2d:
            raise ValueError(
                "ASPPHead: the image-pooling branch with nn.BatchNorm2d cannot train on a batch of "
                "1 image (one value per channel); use batch size >= 2 or SyncBN across devices"
            )
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        branches = [pooled, *(branch(x) for branch in self.aspp_modules)]
        return self._classify(self.bottleneck(torch.cat(branches, dim=1)))
