"""ResNet body with mmcv/mmseg-style options (deep stem, base width, strides, dilations, frozen
stages, frozen BN, deformable 3x3 convs) built from torchvision's residual blocks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from knet_lightning.models.dcn import DeformConv2dPack
from knet_lightning.models.weights import read_weights_file

__all__ = ["ResNetBackbone"]

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
        dcn_stages = tuple(dcn_stages)
        stem_channels = base_channels if stem_channels is None else stem_channels
        _check_settings(depth, frozen_stages, strides, dilations, dcn_stages)
        _check_pretrained(pretrained, depth, deep_stem, base_channels, stem_channels)
        block, num_blocks = _BLOCKS[depth]
        self.depth = depth
        self.deep_stem = deep_stem
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.dcn_stages = dcn_stages
        if deep_stem:
            self.stem = _deep_stem(stem_channels)
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


def _check_settings(
    depth: int, frozen_stages: int, strides: Sequence[int], dilations: Sequence[int], dcn_stages: tuple[bool, ...]
) -> None:
    """Raises a ``ValueError`` naming the setting that :class:`ResNetBackbone` cannot build."""
    if depth not in _BLOCKS:
        raise ValueError(f"backbone depth must be one of {sorted(_BLOCKS)}, got {depth}")
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
    if len(strides) != 4 or len(dilations) != 4:
        raise ValueError(
            f"backbone strides and dilations need 4 values each, got {list(strides)} and {list(dilations)}"
        )
    if len(dcn_stages) != 4 or not all(isinstance(d, bool) for d in dcn_stages):
        raise ValueError(f"backbone dcn_stages needs 4 booleans (one per stage), got {list(dcn_stages)}")
    block, _ = _BLOCKS[depth]
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


def _check_pretrained(pretrained: bool, depth: int, deep_stem: bool, base_channels: int, stem_channels: int) -> None:
    """``pretrained=True`` needs a body that ImageNet weights exist for."""
    no_weights = base_channels != 64 or stem_channels != 64 or (deep_stem and depth not in _IMAGENET_V1C)
    if pretrained and no_weights:
        raise ValueError(
            f"backbone pretrained=true: ImageNet weights exist only for 64 base and stem channels "
            f"(ResNet-18/34/50/101 with the 7x7 stem, ResNetV1c-18/50/101 with the deep stem), "
            f"not for ResNet{'V1c' if deep_stem else ''}-{depth} with base_channels={base_channels}, "
            f"stem_channels={stem_channels}; give a local weights_path for this body"
        )


def _deep_stem(stem_channels: int) -> nn.Sequential:
    """mmseg's ``ResNetV1c`` stem, ``stem.0..stem.8``: three 3x3 conv-BN-ReLU, the first with stride 2."""
    half = stem_channels // 2
    return nn.Sequential(
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
