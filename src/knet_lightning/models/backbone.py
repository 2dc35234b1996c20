"""ResNet body (torchvision) with mmdet-style frozen stages / frozen BN, and an mmdet-style FPN."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models as tvm

_RESNETS: dict[int, tuple[Callable[..., tvm.ResNet], tvm.WeightsEnum, list[int]]] = {
    18: (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    34: (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, [64, 128, 256, 512]),
    50: (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
    101: (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1, [256, 512, 1024, 2048]),
}


class ResNetBackbone(nn.Module):
    """torchvision ResNet body (no avgpool / fc) returning C2..C5.

    Mirrors mmdet's ``ResNet(style='pytorch', frozen_stages=1, norm_eval=True)``:
    the stem and the first ``frozen_stages`` residual stages get ``requires_grad=False``
    and stay in eval mode; with ``norm_eval`` every BatchNorm keeps its running statistics
    (eval mode) even in ``train()``, while the affine parameters of unfrozen stages still train.

    Submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1``..``layer4``) so a
    torchvision ResNet state dict loads directly.

    Args:
        depth: 18, 34, 50 or 101.
        frozen_stages: -1 freezes nothing, 0 the stem, k >= 1 the stem and layer1..layerk.
        norm_eval: keep all BatchNorm layers in eval mode during training.
        pretrained: load torchvision ImageNet (IMAGENET1K_V1) weights; downloads.
        weights_path: a local ``.pth`` with a torchvision ResNet state dict (``fc.*`` ignored).
        replace_stride_with_dilation: dilate layer2..layer4 instead of striding (ResNet-50/101).
    """

    def __init__(
        self,
        depth: int = 50,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        pretrained: bool = False,
        weights_path: str | None = None,
        replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False),
    ) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"backbone depth must be one of {sorted(_RESNETS)}, got {depth}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        if depth in (18, 34) and any(replace_stride_with_dilation):
            raise ValueError(
                f"replace_stride_with_dilation needs a Bottleneck ResNet (50/101); "
                f"ResNet-{depth} BasicBlocks do not support dilation"
            )
        builder, weights, out_channels = _RESNETS[depth]
        net = builder(
            weights=weights if pretrained else None,
            replace_stride_with_dilation=list(replace_stride_with_dilation),
        )
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.depth = depth
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.out_channels: list[int] = list(out_channels)
        if weights_path is not None:
            self.load_weights(weights_path)
        # Apply freezing and norm_eval now, not only on the first .train() call.
        self.train(self.training)

    def load_weights(self, weights_path: str) -> None:
        """Load a torchvision ResNet state dict from a local file (``fc.*`` keys are dropped)."""
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights_path {str(path)!r} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle / zip errors come in many types
            raise RuntimeError(
                f"backbone weights_path {str(path)!r} is not a loadable torch state dict: {err}"
            ) from err
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise RuntimeError(
                f"backbone weights_path {str(path)!r}: expected a dict of tensors "
                f"(a torchvision ResNet state dict), got {type(state).__name__}"
            )
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"backbone weights_path {str(path)!r} does not match a torchvision "
                f"ResNet-{self.depth}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )

    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        if self.frozen_stages >= 0:
            mods += [self.conv1, self.bn1]
        for i in range(1, self.frozen_stages + 1):
            mods.append(getattr(self, f"layer{i}"))
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

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
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


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
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels
        )
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
