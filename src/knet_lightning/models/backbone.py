"""ResNet body with mmcv/mmseg-style options (deep stem, base width, strides, dilations, frozen
stages, frozen BN, deformable 3x3 convs) built from torchvision's residual blocks, and an
mmdet-style FPN."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import deform_conv2d

from knet_lightning.models.swin import SwinBackbone
from knet_lightning.models.weights import read_weights_file

_BLOCKS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}
# ImageNet weights, 64 base channels only: torchvision's for the 7x7 stem, OpenMMLab's
# (``open-mmlab://resnet50_v1c`` of the official semantic configs) for the deep stem
_IMAGENET = {
    18: tvm.ResNet18_Weights.IMAGENET1K_V1,
    34: tvm.ResNet34_Weights.IMAGENET1K_V1,
    50: tvm.ResNet50_Weights.IMAGENET1K_V1,
    101: tvm.ResNet101_Weights.IMAGENET1K_V1,
}
_IMAGENET_V1C = {
    18: "https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth",
    50: "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    101: "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}


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


class ResNetBackbone(nn.Module):
    """ResNet body (no avgpool / fc) returning C2..C5, mmcv ``ResNet`` / ``ResNetV1c`` style.

    The residual blocks are torchvision's ``BasicBlock`` / ``Bottleneck`` (stride on the 3x3
    conv: mmcv's ``style='pytorch'``), so parameter names match both torchvision
    (``conv1``, ``bn1``, ``layer1``..``layer4``) and mmcv (``layer1.0.conv1``,
    ``layer1.0.downsample.0``, ...). With ``deep_stem`` the 7x7 stem becomes mmseg's
    ``ResNetV1c`` stem, ``stem.0..stem.8``: three 3x3 conv-BN-ReLU with
    ``stem_channels // 2``, ``stem_channels // 2`` and ``stem_channels`` outputs, the first
    with stride 2 (mmseg ``backbones/resnet.py``, ``ResNetV1c``).

    ``strides`` / ``dilations`` per stage follow mmseg: the dilated "D8" body of the official
    FCN / PSPNet / DeepLabV3 K-Net configs is ``strides=(1, 2, 1, 1)``,
    ``dilations=(1, 1, 2, 4)``. With ``contract_dilation`` the first block of a dilated stage
    uses half the stage's dilation, as mmseg's ``ResLayer``.

    Freezing mirrors mmdet's ``ResNet(frozen_stages=1, norm_eval=True)``: the stem and the
    first ``frozen_stages`` stages get ``requires_grad=False`` and stay in eval mode; with
    ``norm_eval`` every BatchNorm keeps its running statistics even in ``train()``, while
    the affine parameters of unfrozen stages still train.

    ``dcn_stages`` is mmdet's ``dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
    stage_with_dcn=...`` (the official ``knet_s3_r101_dcn-c3-c5_fpn_ms-3x_coco-panoptic`` uses
    ``(False, True, True, True)``): in each such stage every Bottleneck's 3x3 ``conv2``, the
    strided one included, becomes a :class:`DeformConv2dPack` with the same weight, stride and
    dilation, adding ``conv2.conv_offset.{weight,bias}`` (zero-initialised, so a fresh DCN body
    computes the plain body's function). ImageNet weights have no offset convs: loading them
    leaves the offsets at zero.

    Args:
        depth: 18, 34, 50 or 101.
        frozen_stages: -1 freezes nothing, 0 the stem, k >= 1 the stem and layer1..layerk.
        norm_eval: keep all BatchNorm layers in eval mode during training.
        pretrained: load torchvision ImageNet (IMAGENET1K_V1) weights; downloads. Only for the
            plain body (7x7 stem, 64 base channels).
        weights_path: a local ``.pth`` holding a state dict of this body (torchvision or mmcv
            key names; ``fc.*`` ignored).
        deep_stem: mmseg's ``ResNetV1c`` stem instead of the 7x7 conv.
        stem_channels: output width of the stem (default ``base_channels``).
        base_channels: width of layer1's 3x3 convs; stage i uses ``base_channels * 2**i``
            (64 in every published ResNet).
        strides: stride of each stage's first block.
        dilations: dilation of each stage's 3x3 convs (> 1 needs Bottleneck blocks).
        contract_dilation: halve the dilation of a dilated stage's first block.
        dcn_stages: per stage, whether its 3x3 convs are deformable (mmdet's
            ``stage_with_dcn``; needs Bottleneck blocks, i.e. ResNet-50/101).
    """

    def __init__(
        self,
        depth: int = 50,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        pretrained: bool = False,
        weights_path: str | None = None,
        deep_stem: bool = False,
        stem_channels: int | None = None,
        base_channels: int = 64,
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        contract_dilation: bool = True,
        dcn_stages: Sequence[bool] = (False, False, False, False),
    ) -> None:
        super().__init__()
        if depth not in _BLOCKS:
            raise ValueError(f"backbone depth must be one of {sorted(_BLOCKS)}, got {depth}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        if len(strides) != 4 or len(dilations) != 4:
            raise ValueError(
                f"backbone strides and dilations need 4 values each, got {list(strides)} and {list(dilations)}"
            )
        dcn_stages = tuple(dcn_stages)
        if len(dcn_stages) != 4 or not all(isinstance(d, bool) for d in dcn_stages):
            raise ValueError(f"backbone dcn_stages needs 4 booleans (one per stage), got {list(dcn_stages)}")
        block, num_blocks = _BLOCKS[depth]
        if block is BasicBlock and any(dcn_stages):
            raise ValueError(
                f"backbone dcn_stages {list(dcn_stages)} need a Bottleneck ResNet (50/101); "
                f"ResNet-{depth} BasicBlocks have no deformable conv2"
            )
        if block is BasicBlock and any(d > 1 for d in dilations):
            raise ValueError(
                f"backbone dilations {list(dilations)} need a Bottleneck ResNet (50/101); "
                f"ResNet-{depth} BasicBlocks do not support dilation"
            )
        stem_channels = base_channels if stem_channels is None else stem_channels
        no_weights = base_channels != 64 or stem_channels != 64 or (deep_stem and depth not in _IMAGENET_V1C)
        if pretrained and no_weights:
            raise ValueError(
                f"backbone pretrained=true: ImageNet weights exist only for 64 base and stem channels "
                f"(ResNet-18/34/50/101 with the 7x7 stem, ResNetV1c-18/50/101 with the deep stem), "
                f"not for ResNet{'V1c' if deep_stem else ''}-{depth} with base_channels={base_channels}, "
                f"stem_channels={stem_channels}; give a local weights_path for this body"
            )
        self.depth = depth
        self.deep_stem = deep_stem
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.dcn_stages = dcn_stages
        if deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, half, 3, padding=1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                nn.Conv2d(half, stem_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = stem_channels
        self.out_channels: list[int] = []
        for i, (n, stride, dilation, dcn) in enumerate(zip(num_blocks, strides, dilations, dcn_stages)):
            planes = base_channels * 2**i
            layer = _res_layer(block, in_channels, planes, n, stride, dilation, contract_dilation, dcn)
            self.add_module(f"layer{i + 1}", layer)
            in_channels = planes * block.expansion
            self.out_channels.append(in_channels)
        self._init_weights()
        if pretrained:
            self._load_state(self._download_imagenet(), "ImageNet weights")
        if weights_path is not None:
            self.load_weights(weights_path)
        # Apply freezing and norm_eval now, not only on the first .train() call.
        self.train(self.training)

    def _init_weights(self) -> None:
        # torchvision's and mmcv's ResNet init: Kaiming normal (fan-out) convs, BN weight 1 bias 0
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, DeformConv2dPack)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # ...except the offset convs (reached as nn.Conv2d above): zero, as mmdet's ResNet
        # inits ``conv2.conv_offset`` with DCN, so training starts from the regular grid
        for m in self.modules():
            if isinstance(m, DeformConv2dPack):
                m.init_offset()

    def load_weights(self, weights_path: str) -> None:
        """Load a state dict of this body from a local file (``fc.*`` keys are dropped)."""
        path = Path(weights_path)
        state = read_weights_file(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise RuntimeError(
                f"backbone weights_path {str(path)!r}: expected a dict of tensors "
                f"(a ResNet state dict), got {type(state).__name__}"
            )
        self._load_state(state, f"backbone weights_path {str(path)!r}")

    def _download_imagenet(self) -> dict[str, Tensor]:
        if self.deep_stem:
            state = torch.hub.load_state_dict_from_url(_IMAGENET_V1C[self.depth], map_location="cpu", weights_only=True)
            return state.get("state_dict", state)
        return _IMAGENET[self.depth].get_state_dict(progress=True)

    def _load_state(self, state: dict[str, Tensor], source: str) -> None:
        """Load a body's state dict strictly; ``fc.*`` is dropped, a ``backbone.`` prefix removed.

        A state dict without any ``conv_offset`` key (ImageNet weights, or a plain body's) may
        load into a DCN body: the offset convs keep their zero init. One holding some offset
        convs must hold all of this body's (a different ``dcn_stages`` is an error).
        """
        state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if not any(".conv_offset." in k for k in state):
            missing = [k for k in missing if not self._is_offset_param(k)]
        if missing or unexpected:
            raise RuntimeError(
                f"{source} does not match this "
                f"ResNet{'V1c' if self.deep_stem else ''}-{self.depth}: "
                f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )

    def _is_offset_param(self, name: str) -> bool:
        """Whether ``name`` is a parameter of one of this body's DCN offset convs."""
        module_name, _, param = name.rpartition(".")
        if not module_name.endswith(".conv_offset") or param not in ("weight", "bias"):
            return False
        parent = self.get_submodule(module_name.removesuffix(".conv_offset"))
        return isinstance(parent, DeformConv2dPack)

    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        if self.frozen_stages >= 0:
            mods += [self.stem] if self.deep_stem else [self.conv1, self.bn1]
        for i in range(1, self.frozen_stages + 1):
            mods.append(getattr(self, f"layer{i}"))
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def modules_in_eval_mode(self) -> list[nn.Module]:
        """The modules that :meth:`train` keeps in eval mode: the frozen stages (with their
        children) and, with ``norm_eval``, every BatchNorm."""
        kept = [sub for m in self._frozen_modules() for sub in m.modules()]
        if self.norm_eval:
            kept += [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return list({id(m): m for m in kept}.values())

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Switch mode, but keep frozen stages and (with ``norm_eval``) every BN in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> ``[C2 (B, c2, H/4, W/4), C3 (H/8), C4 (H/16), C5 (H/32)]``."""
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def _res_layer(
    block: type[BasicBlock] | type[Bottleneck],
    in_channels: int,
    planes: int,
    num_blocks: int,
    stride: int,
    dilation: int,
    contract_dilation: bool,
    dcn: bool = False,
) -> nn.Sequential:
    """One stage: ``num_blocks`` blocks, the first with ``stride`` and a 1x1 projection shortcut;
    with ``dcn`` each Bottleneck's 3x3 ``conv2`` is deformable (same shape, stride, dilation)."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
    blocks = [block(in_channels, planes, stride, downsample, dilation=first_dilation)]
    blocks += [block(out_channels, planes, dilation=dilation) for _ in range(1, num_blocks)]
    if dcn:
        for blk in blocks:
            conv = blk.conv2  # torchvision conv3x3: padding = dilation, no bias, groups 1
            blk.conv2 = DeformConv2dPack(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,  # type: ignore[arg-type]
                stride=conv.stride,  # type: ignore[arg-type]
                padding=conv.padding,  # type: ignore[arg-type]
                dilation=conv.dilation,  # type: ignore[arg-type]
            )
    return nn.Sequential(*blocks)


class FPN(nn.Module):
    """mmdet ``FPN`` with ``num_outs == len(in_channels)`` (P2..P5, no extra levels).

    Lateral 1x1 and output 3x3 convs have bias and no norm/activation; the top-down path
    uses nearest upsampling to the finer level's size. Convs are Xavier-uniform initialised
    with zero bias, as mmdet's ``init_cfg``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """``[C2..C5]`` -> ``[P2..P5]``, each ``(B, out_channels, h_l, w_l)`` at the input's size."""
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"FPN expects {len(self.lateral_convs)} feature maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        return [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]


BACKBONES = ("resnet", "swin")


def build_backbone(
    backbone_type: str = "resnet",
    *,
    depth: int = 50,
    base_channels: int = 64,
    deep_stem: bool = False,
    strides: Sequence[int] = (1, 2, 2, 2),
    dilations: Sequence[int] = (1, 1, 1, 1),
    dcn_stages: Sequence[bool] = (False, False, False, False),
    swin_arch: str = "tiny",
    swin_window_size: int = 7,
    drop_path_rate: float = 0.3,
    frozen_stages: int = -1,
    norm_eval: bool = False,
    pretrained: bool = False,
    weights_path: str | None = None,
) -> ResNetBackbone | SwinBackbone:
    """The backbone of a K-Net network: a module with ``out_channels`` (4 ints) whose forward maps
    ``(B, 3, H, W)`` to 4 maps at strides 4, 8, 16, 32 (ResNet D8: 4, 8, 8, 8).

    ``"resnet"`` reads ``depth``, ``base_channels``, ``deep_stem``, ``strides``, ``dilations``,
    ``dcn_stages`` and ``norm_eval``; ``"swin"`` reads ``swin_arch``, ``swin_window_size`` and
    ``drop_path_rate``, and refuses the ResNet-only settings that would change the model
    (dilations, DCN). ``frozen_stages``, ``pretrained`` and ``weights_path`` mean the same for both.
    """
    if backbone_type == "resnet":
        return ResNetBackbone(
            depth=depth,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            pretrained=pretrained,
            weights_path=weights_path,
            deep_stem=deep_stem,
            base_channels=base_channels,
            strides=strides,
            dilations=dilations,
            dcn_stages=dcn_stages,
        )
    if backbone_type == "swin":
        if any(dcn_stages) or any(d != 1 for d in dilations):
            raise ValueError(
                f"backbone_type='swin' has no deformable convs or dilations; got dcn_stages={list(dcn_stages)}, "
                f"dilations={list(dilations)} (ResNet settings)"
            )
        return SwinBackbone(
            arch=swin_arch,
            window_size=swin_window_size,
            drop_path_rate=drop_path_rate,
            frozen_stages=frozen_stages,
            pretrained=pretrained,
            weights_path=weights_path,
        )
    raise ValueError(f"backbone_type must be one of {BACKBONES}, got {backbone_type!r}")
