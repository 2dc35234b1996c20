"""K-Net for semantic segmentation (paper §3.4; the official ``knet/seg/``): one kernel per class.

A decode head (FCN, PSPNet, DeepLabV3 or UPerNet) predicts ordinary segmentation logits and exposes its
``conv_seg`` weights as class kernels. ``S`` kernel update heads then refine the kernels
against the decode head's feature map and each predicts new per-class logits, which are the
segmentation logits of that stage. There is no matching and no classification branch:
kernel n is class n.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knet_lightning.models.backbone import build_backbone
from knet_lightning.models.kernel_update import KernelUpdator, dynamic_conv
from knet_lightning.models.outputs import KernelUpdateOutput, StageOutput, check_images, run_update_stages
from knet_lightning.models.semantic_head import ASPPHead, DecodeHeadOutput, FCNHead, PSPHead, UPerHead

__all__ = ["DECODE_HEADS", "SemanticKNet", "SemanticKernelUpdateHead", "assemble_group_features"]

# the kernel generate heads of the official configs: FCN, PSPNet, DeepLabV3 (ASPP), UPerNet
DECODE_HEADS = ("fcn", "psp", "aspp", "uper")


def assemble_group_features(mask_logits: Tensor, feature: Tensor) -> Tensor:
    """Semantic group feature assembling: softmax over classes, unnormalized pixel sum.

    Args:
        mask_logits: ``(B, N, h, w)`` class logits of the previous stage, already at the
            feature's size.
        feature: ``(B, C, h, w)`` transformed feature map ``F_i``.

    Returns:
        ``(B, N, C)`` float32 ``F^K[b, n] = sum_{u,v} softmax_n(M)[b, n, u, v] * F[b, :, u, v]``.
    """
    # The sum is not normalized by area, so its magnitude grows with the number of pixels
    # and can overflow fp16; keep the softmax and the reduction in fp32 under autocast.
    with torch.autocast(device_type=feature.device.type, enabled=False):
        weights = mask_logits.float().softmax(dim=1)
        return torch.einsum("bnhw,bchw->bnc", weights, feature.float())


class SemanticKernelUpdateHead(nn.Module):
    """One semantic kernel update stage (official ``knet/seg/kernel_update_head.py``).

    Per stage: ``F_i = feat_transform(F)``; soft assembling ``F^K`` with softmax weights;
    the gated ``KernelUpdator``; post-norm 8-head self-attention and FFN over the classes of
    an image; mask FCs; a dynamic 1x1 conv of ``F_i`` with the resulting per-class kernels.

    The updator is ``updator_channels`` (256) wide even when the kernels are wider (512 for
    FCN/PSP/ASPP). As in the official code, every ``in_channels``-d vector is then cut into
    ``in_channels // updator_channels`` consecutive chunks that go through the same updator
    (the assembled feature's chunk j is paired with the kernel's chunk j), and the outputs
    are concatenated back. Attention, FFN, norms and mask FCs work at ``in_channels``.

    Args:
        in_channels: kernel width ``D`` = channels of ``F``.
        updator_channels: width of the ``KernelUpdator``; must divide ``in_channels``.
        num_heads: attention heads.
        feedforward_channels: FFN hidden width.
        num_ffn_fcs: Linear layers in the FFN (mmcv ``FFN``), at least 2.
        num_mask_fcs: number of ``Linear(no bias) → LN → ReLU`` blocks before ``fc_mask``.
        dropout: attention and FFN dropout (0 in the official configs).
    """

    def __init__(
        self,
        in_channels: int = 512,
        updator_channels: int = 256,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
        num_ffn_fcs: int = 2,
        num_mask_fcs: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels % updator_channels != 0:
            raise ValueError(
                f"SemanticKernelUpdateHead: updator_channels={updator_channels} must divide in_channels={in_channels}"
            )
        if in_channels % num_heads != 0:
            raise ValueError(f"SemanticKernelUpdateHead: num_heads={num_heads} must divide in_channels={in_channels}")
        if num_ffn_fcs < 2:
            raise ValueError(f"SemanticKernelUpdateHead: num_ffn_fcs must be >= 2, got {num_ffn_fcs}")
        self.in_channels = in_channels
        self.updator_channels = updator_channels
        self.num_chunks = in_channels // updator_channels

        self.feat_transform = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.kernel_update_conv = KernelUpdator(
            in_channels=updator_channels, feat_channels=updator_channels, out_channels=updator_channels
        )
        self.attention = nn.MultiheadAttention(in_channels, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(in_channels)

        ffn: list[nn.Module] = []
        width = in_channels
        for _ in range(num_ffn_fcs - 1):
            ffn += [nn.Linear(width, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = feedforward_channels
        ffn += [nn.Linear(width, in_channels), nn.Dropout(dropout)]
        self.ffn = nn.Sequential(*ffn)
        self.ffn_norm = nn.LayerNorm(in_channels)

        mask_fcs: list[nn.Module] = []
        for _ in range(num_mask_fcs):
            mask_fcs += [
                nn.Linear(in_channels, in_channels, bias=False),
                nn.LayerNorm(in_channels),
                nn.ReLU(inplace=True),
            ]
        self.mask_fcs = nn.Sequential(*mask_fcs)
        self.fc_mask = nn.Linear(in_channels, in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation the official semantic heads actually start from.

        Their class defines a Xavier ``init_weights`` (official ``knet/seg/kernel_update_head.py``,
        MMSegmentation's ``knet_head.py``), but ``IterativeDecodeHead`` keeps the heads in a
        plain ``nn.ModuleList`` (``knet/seg/iter_decode_head.py``), and mmcv's
        ``BaseModule.init_weights`` only calls ``init_weights`` on children that have one: it
        never reaches them. Every layer keeps PyTorch's default, except ``feat_transform``, an
        mmcv ``ConvModule``, whose constructor draws the weight Kaiming-normal (fan-out, ReLU)
        and zeroes the bias.
        """
        nn.init.kaiming_normal_(self.feat_transform.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.feat_transform.bias)

    def update_kernels(self, assembled: Tensor, kernels: Tensor) -> Tensor:
        """Run the ``KernelUpdator`` on ``updator_channels``-wide chunks of each vector.

        Args:
            assembled: ``(B, N, D)`` assembled group features ``F^K``.
            kernels: ``(B, N, D)`` kernels of the previous stage.

        Returns:
            ``(B, N, D)``; chunk j of row n is ``updator(assembled[..., j], kernels[..., j])``.
        """
        b, n, d = kernels.shape
        c = self.updator_channels
        out = self.kernel_update_conv(
            assembled.reshape(b, n * self.num_chunks, c), kernels.reshape(b, n * self.num_chunks, c)
        )
        return out.reshape(b, n, d)

    def forward(self, feature: Tensor, kernels: Tensor, mask_logits: Tensor) -> KernelUpdateOutput:
        """Args:
            feature: ``(B, D, h, w)`` decode-head feature ``F`` (the same for every stage).
            kernels: ``(B, N, D)`` class kernels of the previous stage.
            mask_logits: ``(B, N, h', w')`` class logits of the previous stage; resized
                bilinearly to ``(h, w)`` when they differ.

        Returns:
            ``KernelUpdateOutput(kernels (B, N, D), logits (B, N, h, w), None)`` of this stage.
        """
        if feature.dim() != 4 or feature.shape[1] != self.in_channels:
            raise ValueError(
                f"SemanticKernelUpdateHead: feature must be (B, {self.in_channels}, h, w), got {tuple(feature.shape)}"
            )
        b = feature.shape[0]
        if kernels.dim() != 3 or kernels.shape[0] != b or kernels.shape[2] != self.in_channels:
            raise ValueError(
                f"SemanticKernelUpdateHead: kernels must be ({b}, N, {self.in_channels}), got {tuple(kernels.shape)}"
            )
        if mask_logits.dim() != 4 or mask_logits.shape[:2] != kernels.shape[:2]:
            raise ValueError(
                f"SemanticKernelUpdateHead: mask_logits must be ({b}, {kernels.shape[1]}, h, w), "
                f"got {tuple(mask_logits.shape)}"
            )
        x = self.feat_transform(feature)
        if mask_logits.shape[-2:] != x.shape[-2:]:
            mask_logits = F.interpolate(mask_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

        assembled = assemble_group_features(mask_logits, x)
        # The updator sees the unnormalized sums, so it stays in fp32 too (a few small Linears).
        with torch.autocast(device_type=x.device.type, enabled=False):
            kernels = self.update_kernels(assembled, kernels.float())

        # Post-norm transformer layer over the N class kernels of each image.
        attended = self.attention(kernels, kernels, kernels, need_weights=False)[0]
        kernels = self.attention_norm(kernels + attended)
        kernels = self.ffn_norm(kernels + self.ffn(kernels))

        mask_kernels = self.fc_mask(self.mask_fcs(kernels))
        # Dynamic 1x1 conv of F_i with per-image class kernels, as one batched einsum.
        logits = dynamic_conv(mask_kernels, x)
        return KernelUpdateOutput(kernels, logits, None)


def _check_settings(num_classes: int, decode_head: str, num_stages: int, backbone_type: str) -> None:
    """Raises a ``ValueError`` naming the setting that :class:`SemanticKNet` cannot build."""
    if num_classes < 2:
        raise ValueError(
            f"SemanticKNet: num_classes must be >= 2 (assembling is a softmax over class "
            f"kernels; use a 2-class fg/bg formulation for binary tasks), got {num_classes}"
        )
    if decode_head not in DECODE_HEADS:
        raise ValueError(f"SemanticKNet: decode_head must be one of {DECODE_HEADS}, got {decode_head!r}")
    if num_stages < 0:
        raise ValueError(f"SemanticKNet: num_stages must be >= 0, got {num_stages}")
    if backbone_type == "swin" and decode_head != "uper":
        raise ValueError(
            f"SemanticKNet: decode_head={decode_head!r} needs the dilated ResNet (stride 8); "
            f"with backbone_type='swin' use decode_head='uper', as the K-Net Swin configs"
        )


def _decode_head(
    kind: str,
    levels: list[int],
    channels: int,
    num_classes: int,
    dropout: float,
    fcn_num_convs: int,
    pool_scales: tuple[int, ...],
    aspp_dilations: tuple[int, ...],
) -> nn.Module:
    """The decode head ``kind`` (one of :data:`DECODE_HEADS`) on backbone maps of ``levels`` channels:
    FCN, PSPNet and DeepLabV3 read C5, UPerNet fuses C2..C5."""
    if kind == "fcn":
        return FCNHead(
            in_channels=levels[3],
            channels=channels,
            num_classes=num_classes,
            num_convs=fcn_num_convs,
            concat_input=True,
            dropout=dropout,
            in_index=3,
        )
    if kind == "psp":
        return PSPHead(levels[3], channels, num_classes, pool_scales, dropout, in_index=3)
    if kind == "aspp":
        return ASPPHead(levels[3], channels, num_classes, aspp_dilations, dropout, in_index=3)
    return UPerHead(
        in_channels=levels,
        channels=channels,
        num_classes=num_classes,
        pool_scales=pool_scales,
        dropout=dropout,
    )


def _auxiliary_head(levels: list[int], channels: int, num_classes: int, dropout: float) -> FCNHead:
    """The auxiliary FCN head on C4 (1 conv, no concat) of the 0.4-weighted auxiliary CE loss."""
    return FCNHead(
        in_channels=levels[2],
        channels=channels,
        num_classes=num_classes,
        num_convs=1,
        concat_input=False,
        dropout=dropout,
        in_index=2,
    )


class SemanticKNet(nn.Module):
    """K-Net for semantic segmentation: ResNet → decode head → S update heads.

    The official semantic configs use mmseg's ``ResNetV1c`` (``deep_stem=True``: three 3x3
    convs instead of the 7x7 stem); ``deep_stem=False`` gives torchvision's body, whose
    ImageNet weights ``pretrained`` downloads. ``backbone_type="swin"`` gives the Swin
    Transformer of the K-Net Swin models (``swin_arch``, ``swin_window_size``,
    ``drop_path_rate``), with the UPerNet head only.

    ``decode_head`` ``"fcn"``, ``"psp"`` and ``"aspp"`` use the dilated D8 ResNet (layer3/4
    dilated with contracted first blocks, features at stride 8; needs a Bottleneck ResNet,
    50/101) and read C5: FCN (2 convs + concat input), PSPNet (PPM, scales 1, 2, 3, 6) or
    DeepLabV3 (ASPP, dilations 1, 12, 24, 36), 512 channels. ``"uper"`` uses the plain ResNet
    and UPerHead fusing C2..C5 at stride 4 with 256 channels (the original K-Net repo;
    MMSegmentation 1.x's config uses 512: ``channels=512``). An auxiliary FCN head on C4
    (1 conv, ``aux_channels``, no concat) feeds the 0.4-weighted auxiliary CE loss.

    Output structure: ``forward`` always returns ``num_stages + 1`` ``StageOutput`` s with
    ``cls_logits=None``. ``sem_logits`` of stage 0 holds the auxiliary logits in training
    mode and is ``None`` in eval mode (the aux head is skipped at inference), so the output
    pytree is fixed for a given mode; export in eval mode.

    Args:
        num_classes: number of classes (>= 2: assembling is a softmax over the classes).
        decode_head: one of ``DECODE_HEADS``: ``"fcn"``, ``"psp"``, ``"aspp"``, ``"uper"``.
        num_stages: number S of kernel update heads (0 gives the plain decode head).
        backbone_depth: ResNet depth (18, 34, 50, 101).
        frozen_stages: backbone stages to freeze (-1: none, as mmseg trains all).
        norm_eval: keep backbone BN in eval mode.
        pretrained: load torchvision ImageNet weights (never in tests).
        weights_path: local backbone checkpoint instead of a download.
        deep_stem: mmseg's ``ResNetV1c`` stem (the official configs) instead of the 7x7 conv.
        backbone_type: ``"resnet"`` or ``"swin"`` (:func:`~knet_lightning.models.backbone.build_backbone`).
        backbone_dcn_stages: ResNet stages with deformable 3x3 convs (mmdet's ``stage_with_dcn``).
        swin_arch: ``"tiny"``, ``"small"``, ``"base"`` or ``"large"``.
        swin_window_size: Swin attention window (7, or 12).
        drop_path_rate: Swin stochastic depth of the last block.
        channels: decode-head width = kernel width D; default 256 (uper) / 512 (the others).
        aux_channels: width of the auxiliary FCN head.
        aux_head: build the auxiliary head.
        feedforward_channels: FFN hidden width in the update heads.
        num_heads: attention heads in the update heads.
        dropout: ``Dropout2d`` rate before the decode heads' ``conv_seg``.
        updator_channels: ``KernelUpdator`` width (256); must divide ``channels``.
        pool_scales: PPM scales of PSPHead and UPerHead.
        aspp_dilations: ASPPHead branch dilations.
        fcn_num_convs: convs of the FCN decode head.
        update_dropout: attention/FFN dropout in the update heads (0 officially).
    """

    def __init__(
        self,
        num_classes: int,
        decode_head: str = "uper",
        num_stages: int = 3,
        backbone_depth: int = 50,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        pretrained: bool = False,
        weights_path: str | None = None,
        deep_stem: bool = False,
        backbone_type: str = "resnet",
        backbone_dcn_stages: Sequence[bool] = (False, False, False, False),
        swin_arch: str = "tiny",
        swin_window_size: int = 7,
        drop_path_rate: float = 0.3,
        channels: int | None = None,
        aux_channels: int = 256,
        aux_head: bool = True,
        feedforward_channels: int = 2048,
        num_heads: int = 8,
        dropout: float = 0.1,
        updator_channels: int = 256,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        aspp_dilations: tuple[int, ...] = (1, 12, 24, 36),
        fcn_num_convs: int = 2,
        update_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_settings(num_classes, decode_head, num_stages, backbone_type)
        if channels is None:
            channels = 256 if decode_head == "uper" else 512
        self.num_classes = num_classes
        # one kernel per class: the N of the semantic model
        self.num_proposals = num_classes
        self.decode_head_type = decode_head
        self.num_stages = num_stages
        self.channels = channels

        dilated = decode_head != "uper"
        self.backbone = build_backbone(
            backbone_type,
            depth=backbone_depth,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            pretrained=pretrained,
            weights_path=weights_path,
            deep_stem=deep_stem,
            dcn_stages=backbone_dcn_stages,
            strides=(1, 2, 1, 1) if dilated else (1, 2, 2, 2),
            dilations=(1, 1, 2, 4) if dilated else (1, 1, 1, 1),
            swin_arch=swin_arch,
            swin_window_size=swin_window_size,
            drop_path_rate=drop_path_rate,
        )
        levels = list(self.backbone.out_channels)
        self.output_stride = 8 if dilated else 4

        self.decode_head: nn.Module = _decode_head(
            decode_head, levels, channels, num_classes, dropout, fcn_num_convs, pool_scales, aspp_dilations
        )
        self.auxiliary_head = _auxiliary_head(levels, aux_channels, num_classes, dropout) if aux_head else None
        self.kernel_update_heads = nn.ModuleList(
            SemanticKernelUpdateHead(
                in_channels=channels,
                updator_channels=updator_channels,
                num_heads=num_heads,
                feedforward_channels=feedforward_channels,
                dropout=update_dropout,
            )
            for _ in range(num_stages)
        )

    def forward(self, images: Tensor) -> list[StageOutput]:
        """Args:
            images: ``(B, 3, H, W)`` normalized images of any size.

        Returns:
            ``num_stages + 1`` stage outputs. ``mask_logits`` are ``(B, num_classes, H/s, W/s)``
            (sizes rounded up as the strided convs give them)
            with s = 4 (uper) or 8 (the others); ``kernels`` are ``(B, num_classes, channels)``
            (stage 0: ``conv_seg`` weights, expanded); ``cls_logits`` is ``None``; stage 0's
            ``sem_logits`` is the aux head's ``(B, num_classes, H/16, W/16)`` (D8: H/8) in
            training mode, else ``None``.
        """
        # any size, as MMSegmentation's whole-image inference: every layer here resizes to the
        # sizes it meets (the collate function still pads batches to data.size_divisor)
        check_images(images, "SemanticKNet", divisor=1)

        features = self.backbone(images)
        decoded: DecodeHeadOutput = self.decode_head(features)
        aux_logits = self.auxiliary_head(features).logits if self.auxiliary_head is not None and self.training else None
        logits = decoded.logits
        kernels = decoded.kernels.unsqueeze(0).expand(images.shape[0], -1, -1)
        # Every stage reads the same decode-head feature F, as in IterativeDecodeHead.
        first = StageOutput(logits, None, kernels, aux_logits)
        return run_update_stages(first, self.kernel_update_heads, decoded.feature, kernels, logits)
