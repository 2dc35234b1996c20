"""The model output contract shared by the model, the criterion and post-processing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from torch import Tensor, nn


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
    cls_logits: Tensor | None
    kernels: Tensor
    sem_logits: Tensor | None = None


class KernelUpdateOutput(NamedTuple):
    """One kernel update stage's results (``KernelUpdateHead``, ``SemanticKernelUpdateHead``).

    Attributes:
        kernels: ``(B, N, C)`` updated kernels K_i (input of the next stage).
        mask_logits: ``(B, N, h, w)`` mask logits at the feature's stride (the next stage's input).
        cls_logits: ``(B, N, num_classes)`` sigmoid class logits; ``None`` for the semantic
            heads, whose kernel n is class n.
    """

    kernels: Tensor
    mask_logits: Tensor
    cls_logits: Tensor | None


def run_update_stages(
    first: StageOutput, heads: Iterable[nn.Module], feature: Tensor, kernels: Tensor, mask_logits: Tensor,
    shown: Callable[[Tensor], Tensor] = lambda logits: logits,
) -> list[StageOutput]:  # fmt: skip
    """Stage 0's output followed by one per update head (paper §3.2, Eq. (7)-(10)).

    Every head reads the same feature map and the previous stage's kernels and mask logits
    ``(B, N, h, w)``, and returns a :class:`KernelUpdateOutput`; ``shown`` is what a stage
    returns of its mask logits (K-Net: upsampled x2, while the next stage reads the
    feature-stride ones; the semantic heads: as they are).
    """
    outputs = [first]
    for head in heads:
        kernels, mask_logits, cls_logits = head(feature, kernels, mask_logits)
        outputs.append(StageOutput(shown(mask_logits), cls_logits, kernels, None))
    return outputs


def check_images(images: Tensor, owner: str, divisor: int = 32) -> None:
    """The networks' input contract: ``(B, 3, H, W)`` with H and W multiples of ``divisor``
    (the backbone's coarsest stride; the collate function pads to it)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{owner}: images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % divisor or w % divisor:
        raise ValueError(f"{owner}: image height and width must be multiples of {divisor}, got {h}x{w} (pad the batch)")
