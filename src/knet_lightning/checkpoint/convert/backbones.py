"""The backbone part of a published checkpoint, in the layout our backbone module reads.

ResNet bodies (plain, V1c, DCN) have mmcv's names on both sides. A Swin backbone's published
layout is OpenMMLab's ``SwinTransformer`` (MMDetection 2.x for the official K-Net Swin-L,
MMSegmentation for its K-Net Swin models), which :mod:`knet_lightning.models.swin` translates:
other names and the ``nn.Unfold`` channel order of the patch-merging weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from knet_lightning.models.swin import SwinBackbone, swin_from_openmmlab, swin_to_openmmlab

__all__ = ["backbone_from_published", "backbone_layout", "backbone_to_published"]

_PREFIX = "backbone."


def backbone_layout(backbone: nn.Module) -> str:
    """A name for the published layout of ``backbone``'s weights (recorded in converted checkpoints)."""
    return "OpenMMLab SwinTransformer" if isinstance(backbone, SwinBackbone) else "mmcv ResNet"


def _translate(
    state: Mapping[str, Tensor], translate: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
) -> dict[str, Tensor]:
    inner = {k.removeprefix(_PREFIX): v for k, v in state.items() if k.startswith(_PREFIX)}
    out = {k: v for k, v in state.items() if not k.startswith(_PREFIX)}
    out.update({_PREFIX + k: v for k, v in translate(inner).items()})
    return out


def backbone_from_published(state: Mapping[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """``state`` (a whole published network) with its ``backbone.*`` part in our layout."""
    if isinstance(backbone, SwinBackbone):
        return _translate(state, swin_from_openmmlab)
    return dict(state)


def backbone_to_published(state: Mapping[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """Inverse of :func:`backbone_from_published` (Swin's index buffers, a function of the window
    size, are not restored)."""
    if isinstance(backbone, SwinBackbone):
        return _translate(state, swin_to_openmmlab)
    return dict(state)
