"""K-Net for instance and panoptic segmentation: backbone -> FPN -> semantic FPN -> kernel head -> S update heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from knet_lightning.models.backbone import FPN, build_backbone
from knet_lightning.models.kernel_head import KernelHead
from knet_lightning.models.kernel_update import KernelUpdateHead
from knet_lightning.models.neck import SemanticFPNNeck
from knet_lightning.models.outputs import StageOutput, check_images, run_update_stages


def _upsample2x(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class KNet(nn.Module):
    """K-Net (instance / panoptic) returning the outputs of every stage for deep supervision.

    ``num_kernels = num_proposals + num_stuff``; kernel ``num_proposals + k`` is stuff class
    ``num_things + k``; classifiers and ``conv_seg`` have ``num_things + num_stuff`` outputs.
    Panoptic networks have a stuff kernel per stuff class; instance networks have none
    (``num_stuff=0``, the instance configs' setting: stuff regions are not instances). The
    network does not know the task: that is :mod:`knet_lightning.tasks`' business.

    ``backbone_type`` is ``"resnet"`` (``backbone_depth``, ``backbone_base_channels``: the
    width of the first stage, mmdet's ``base_channels``, 64 in every published ResNet, whose
    ImageNet weights need it; ``backbone_dcn_stages``: mmdet's ``stage_with_dcn``) or
    ``"swin"`` (``swin_arch``, ``swin_window_size``, ``drop_path_rate``); see
    :func:`~knet_lightning.models.backbone.build_backbone`. The synthetic default trains a
    half-width ResNet-18 from scratch.

    The backbone lives under the attribute ``backbone`` (the optimizer scales its lr);
    :func:`knet_lightning.training.optim.param_groups` splits the trainable parameters accordingly.
    """

    def __init__(
        self,
        num_things: int,
        num_stuff: int = 0,
        num_proposals: int = 100,
        num_stages: int = 3,
        backbone_depth: int = 50,
        backbone_base_channels: int = 64,
        backbone_type: str = "resnet",
        backbone_dcn_stages: Sequence[bool] = (False, False, False, False),
        swin_arch: str = "tiny",
        swin_window_size: int = 7,
        drop_path_rate: float = 0.3,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        pretrained: bool = False,
        weights_path: str | None = None,
        channels: int = 256,
        num_groups: int = 32,
        feedforward_channels: int = 2048,
        num_heads: int = 8,
        num_cls_fcs: int = 1,
        num_mask_fcs: int = 1,
        hard_mask_thr: float = 0.5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_things < 1:
            raise ValueError(f"KNet num_things must be >= 1, got {num_things}")
        if num_stuff < 0:
            raise ValueError(f"KNet num_stuff must be >= 0, got {num_stuff}")
        if num_stages < 0:
            raise ValueError(f"KNet num_stages must be >= 0, got {num_stages}")
        if num_proposals < 1:
            raise ValueError(f"KNet num_proposals must be >= 1, got {num_proposals}")
        self.num_things = num_things
        self.num_stuff = num_stuff
        self.num_classes = self.num_things + self.num_stuff
        self.num_proposals = num_proposals
        self.num_kernels = num_proposals + self.num_stuff
        self.num_stages = num_stages

        self.backbone = build_backbone(
            backbone_type,
            depth=backbone_depth,
            base_channels=backbone_base_channels,
            dcn_stages=backbone_dcn_stages,
            swin_arch=swin_arch,
            swin_window_size=swin_window_size,
            drop_path_rate=drop_path_rate,
            frozen_stages=frozen_stages,
            norm_eval=norm_eval,
            pretrained=pretrained,
            weights_path=weights_path,
        )
        self.fpn = FPN(self.backbone.out_channels, channels)
        self.neck = SemanticFPNNeck(channels, channels, num_groups, num_levels=len(self.backbone.out_channels))
        self.kernel_head = KernelHead(
            num_proposals=num_proposals,
            num_things=self.num_things,
            num_stuff=self.num_stuff,
            channels=channels,
            num_groups=num_groups,
            hard_mask_thr=hard_mask_thr,
        )
        self.update_heads = nn.ModuleList(
            KernelUpdateHead(
                num_classes=self.num_classes,
                channels=channels,
                feedforward_channels=feedforward_channels,
                num_heads=num_heads,
                num_cls_fcs=num_cls_fcs,
                num_mask_fcs=num_mask_fcs,
                hard_mask_thr=hard_mask_thr,
                dropout=dropout,
            )
            for _ in range(num_stages)
        )

    def forward(self, images: Tensor) -> list[StageOutput]:
        """Run all stages.

        Args:
            images: ``(B, 3, H, W)`` normalized images, H and W multiples of 32.

        Returns:
            ``[stage 0, stage 1, ..., stage S]``; each ``mask_logits`` is ``(B, N, H/4, W/4)``.
            Stage 0 has ``cls_logits=None`` and ``sem_logits`` ``(B, num_classes, H/8, W/8)``.
        """
        check_images(images, "KNet.forward")
        loc_feat, sem_feat = self.neck(self.fpn(self.backbone(images)))
        head = self.kernel_head(loc_feat, sem_feat)
        first = StageOutput(_upsample2x(head.mask_logits), None, head.kernels, head.sem_logits)
        # The next stage gathers with the stride-8 masks; only the returned copy is upsampled.
        return run_update_stages(first, self.update_heads, head.features, head.kernels, head.mask_logits, _upsample2x)
