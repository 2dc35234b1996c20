"""Key names of the official K-Net release's detection checkpoints (MMDetection 2.x) and ours.

The official ``knet/det/`` model (``configs/det/knet/knet_s3_r50_fpn_1x_coco*.py``): mmdet's
ResNet ``backbone``, its FPN as ``neck``, the ``rpn_head`` (``ConvKernelHead``) holding the
semantic FPN ``localization_fpn`` (``SemanticFPNWrapper``) and the initial kernels, and
``roi_head.mask_head.<i>`` (``KernelUpdateHead``) for the S update stages. mmcv ``ConvModule`` s
name their parts ``.conv`` / ``.gn``; ``SemanticFPNWrapper`` names a level's layers ``conv<j>``
and ``upsample<j>``, where our ``nn.Sequential`` numbers them (conv j at index 2j). Ours are
:class:`~knet_lightning.models.knet.KNet`'s: ``fpn`` is the official ``neck``, ``neck`` the
official ``rpn_head.localization_fpn``. The stuff kernels are rows ``num_things:`` of
``conv_seg`` on both sides; instance and panoptic checkpoints differ only in class counts.
"""

from __future__ import annotations

from knet_lightning.checkpoint.convert.mapping import KeyMapping, kernel_update_head_pairs

_LOC = "rpn_head.localization_fpn"

MMDET_KNET = KeyMapping(
    [
        ("backbone.{rest}", "backbone.{rest}"),
        ("neck.lateral_convs.{i}.conv.{rest}", "fpn.lateral_convs.{i}.{rest}"),
        ("neck.fpn_convs.{i}.conv.{rest}", "fpn.fpn_convs.{i}.{rest}"),
        *(
            (
                f"{_LOC}.convs_all_levels.{{lvl}}.conv{j}.{part}.{{rest}}",
                f"neck.convs_all_levels.{{lvl}}.{2 * j}.{k}.{{rest}}",
            )
            for j in range(3)
            for k, part in enumerate(("conv", "gn"))
        ),
        (f"{_LOC}.conv_pred.conv.{{rest}}", "neck.conv_pred.0.{rest}"),
        (f"{_LOC}.conv_pred.gn.{{rest}}", "neck.conv_pred.1.{rest}"),
        (f"{_LOC}.aux_convs.0.conv.{{rest}}", "neck.aux_conv.0.{rest}"),
        (f"{_LOC}.aux_convs.0.gn.{{rest}}", "neck.aux_conv.1.{rest}"),
        ("rpn_head.loc_convs.0.conv.{rest}", "kernel_head.loc_convs.0.{rest}"),
        ("rpn_head.loc_convs.0.gn.{rest}", "kernel_head.loc_convs.1.{rest}"),
        ("rpn_head.seg_convs.0.conv.{rest}", "kernel_head.seg_convs.0.{rest}"),
        ("rpn_head.seg_convs.0.gn.{rest}", "kernel_head.seg_convs.1.{rest}"),
        ("rpn_head.init_kernels.{rest}", "kernel_head.init_kernels.{rest}"),
        ("rpn_head.conv_seg.{rest}", "kernel_head.conv_seg.{rest}"),
        *kernel_update_head_pairs("roi_head.mask_head.{i}", "update_heads.{i}"),
    ],
    name="official K-Net (MMDetection 2.x) detection, mapping v1",
)
