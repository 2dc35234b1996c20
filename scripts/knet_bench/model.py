"""The K-Net under test and the two steps the knet and scaling sections time.

The model is the package's own :class:`~knet_lightning.module.KNetModule` (network +
criterion): the train step runs its ``training_loss`` (forward + matching + losses, what
``training_step`` runs) and then backward and the step of the package's AdamW
(:func:`knet_lightning.training.optim.build_optimizer`), so the benchmark measures the training code
itself, not a copy of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from knet_lightning.criterion.criterion import KNetCriterion
from knet_lightning.models.knet import KNet
from knet_lightning.module import KNetModule
from knet_lightning.runtime.memory_format import prefers_channels_last
from knet_lightning.training.optim import OptimizerSettings, build_optimizer

from .common import NUM_STUFF, NUM_THINGS, Context
from .timing import PartTimer, part_of


def build_knet(ctx: Context, num_proposals: int, num_stages: int, **net_kwargs: Any) -> KNetModule:
    """K-Net panoptic (COCO classes) with random weights, and its criterion, in a KNetModule.

    ``net_kwargs`` go to :class:`KNet` (the backbone: ``backbone_type``, ``backbone_depth``,
    ...); by default the profile's ResNet depth.
    """
    torch.manual_seed(ctx.seed)
    net_kwargs.setdefault("backbone_depth", ctx.profile.depth)
    net = KNet(
        num_things=NUM_THINGS,
        num_stuff=NUM_STUFF,
        num_proposals=num_proposals,
        num_stages=num_stages,
        **net_kwargs,
    )
    criterion = KNetCriterion(NUM_THINGS, NUM_STUFF, num_proposals)
    # no lr schedule runs here; step milestones need no trainer to convert epochs
    module = KNetModule(
        net,
        criterion,
        task="panoptic",
        channels_last=False,  # set per mode by in_layout()
        scheduler={"milestones": [], "milestone_unit": "step"},
    )
    return module.to(ctx.device)


def in_layout(ctx: Context, module: KNetModule, images: Tensor, training: bool) -> Tensor:
    """Puts the network in the memory format of ``ctx`` for this mode and returns ``images`` in it.

    The input is converted here, outside the timed steps, so that the forward's own conversion
    is a no-op and the layout copy of the input is not timed.
    """
    channels_last = {"channels-last": True, "nchw": False}.get(ctx.memory_format)
    if channels_last is None:
        channels_last = prefers_channels_last(ctx.device, training)
    module.channels_last = channels_last
    layout = torch.channels_last if channels_last else torch.contiguous_format
    module.net.to(memory_format=layout)
    return images.contiguous(memory_format=layout)


def attach_knet(timer: PartTimer, module: KNetModule) -> None:
    """Hooks on the stages of ``KNet.forward`` and on the criterion and its matcher."""
    net, criterion = module.net, module.criterion
    timer.attach(net.backbone, "backbone")
    timer.attach(net.fpn, "fpn_neck")
    timer.attach(net.neck, "fpn_neck")
    timer.attach(net.kernel_head, "kernel_head")
    for head in net.update_heads:
        timer.attach(head, "update_stages")
    # the criterion part includes the matching; breakdown() splits them into matching + losses
    timer.attach(criterion, "criterion")
    timer.attach(criterion.matcher, "matching")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (bf16 is what ``trainer.precision=bf16-mixed`` runs); None: nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(module: KNetModule, implementation: str = "auto") -> torch.optim.Optimizer:
    """The package's training recipe (AdamW, lr 1e-4, weight decay 0.05, backbone at 0.25 x lr)
    with the AdamW kernel ``implementation`` (``--optimizer``)."""
    return build_optimizer(module.net, OptimizerSettings(implementation=implementation))


def knet_infer_step(
    module: KNetModule, images: Tensor, timer: PartTimer | None, amp_dtype: torch.dtype | None = None
) -> Callable[[], None]:
    """Forward + panoptic post-processing of every image (the module's task object, as
    validation runs it), under ``inference_mode``."""
    size = tuple(images.shape[-2:])
    part = part_of(timer)

    def step() -> None:
        with torch.inference_mode():
            with autocast(images.device, amp_dtype):
                last = module(images)[-1]
            with part("postprocess"):
                for b in range(images.shape[0]):
                    module.task.postprocess(last, b, size, size, size)

    return step


def knet_train_step(
    module: KNetModule,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    targets: list[dict[str, Tensor]],
    timer: PartTimer | None,
    amp_dtype: torch.dtype | None = None,
) -> Callable[[], None]:
    """Forward + matching + losses (``KNetModule.training_loss``) + backward + AdamW step.

    The criterion and matching parts come from the hooks of :func:`attach_knet`.
    """
    part = part_of(timer)

    def step() -> None:
        with autocast(images.device, amp_dtype):
            loss, _ = module.training_loss(images, targets)
        with part("backward"):
            loss.backward()
        with part("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step
