"""The model output contract shared by the model, the criterion and post-processing."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class StageOutput(NamedTuple):
    """What one K-Net stage produces. ``KNet.forward`` returns one per stage, 0..S.

    A ``NamedTuple`` (not a dataclass) so that ``torch.export`` and TorchScript see a
    plain pytree of tensors.

    Attributes:
        mask_logits: ``(B, N, H/4, W/4)`` mask logits at stride 4 (after the x2 upsample of
            the stride-8 dynamic-conv output). Panoptic: ``N = num_proposals + num_stuff``,
            kernel ``num_proposals + k`` is stuff class ``num_things + k``. Semantic:
            ``N = num_classes`` at the decode head's stride, kernel n is class n.
        cls_logits: ``(B, N, C)`` sigmoid class logits (no background logit); ``None`` at
            stage 0 and for the semantic task.
        kernels: ``(B, N, D)`` the kernels after this stage.
        sem_logits: stage 0 only: ``(B, C, H/8, W/8)`` auxiliary semantic logits of the
            kernel head (instance/panoptic), or the auxiliary FCN head's logits (semantic).
            ``None`` at later stages.
    """

    mask_logits: Tensor
    cls_logits: Optional[Tensor]
    kernels: Tensor
    sem_logits: Optional[Tensor] = None


def check_images(images: Tensor, owner: str, divisor: int = 32) -> None:
    """The networks' input contract: ``(B, 3, H, W)`` with H and W multiples of ``divisor``
    (the backbone's coarsest stride; the collate function pads to it)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{owner}: images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % divisor or w % divisor:
        raise ValueError(f"{owner}: image height and width must be multiples of {divisor}, got {h}x{w} (pad the batch)")
