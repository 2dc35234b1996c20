"""The backbone of a K-Net network, ResNet (:mod:`~knet_lightning.models.resnet`) or Swin
(:mod:`~knet_lightning.models.swin`), chosen by :func:`build_backbone`, and the mmdet-style FPN
on the ResNet's or Swin's 4 maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from knet_lightning.models.resnet import ResNetBackbone
from knet_lightning.models.swin import SwinBackbone

__all__ = ["BACKBONES", "FPN", "build_backbone"]


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
