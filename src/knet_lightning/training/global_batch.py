"""The global batch a paper experiment was published with, and what a run with another one does.

The published K-Net numbers were trained with a fixed global batch (e.g. 8 GPUs x 2 images = 16;
the Swin-L panoptic run 16 x 2 = 32), which an experiment records as ``base_batch_size``. A
training run's global batch is ``devices x nodes x data.batch_size x accumulation``; where it
differs, the run says so at start and applies ``batch_remedy``, one of the references' remedies:

- ``none``: train as configured (the learning rate and schedule are the published ones);
- ``scale_lr``: mmengine's ``auto_scale_lr``, the linear scaling rule: ``lr x global / base``
  (every parameter group, since their rates are multiples of ``model.optimizer.lr``);
- ``accumulate``: gradient accumulation up to the published global batch (``base`` must be a
  multiple of ``devices x nodes x data.batch_size``); optimizer steps, the schedule and
  ``trainer.val_check_interval`` (counted in batches by Lightning) keep the published step counts.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

REMEDIES = ("none", "scale_lr", "accumulate")


@dataclass(frozen=True)
class BatchPlan:
    """What a run does about its global batch.

    Attributes:
        global_batch: ``per_device x world_size x accumulate`` as configured.
        base_batch: the published global batch (None: the experiment records none).
        lr_factor: the learning rate's multiplier (``scale_lr``), else 1.
        accumulate: the batches accumulated into one optimizer step after the remedy.
        message: the line the run logs (empty where the batches agree or none is recorded).
    """

    global_batch: int
    base_batch: int | None
    lr_factor: float = 1.0
    accumulate: int = 1
    message: str = ""


def plan_global_batch(
    per_device: int, world_size: int, accumulate: int, base_batch: int | None, remedy: str = "none"
) -> BatchPlan:
    """The :class:`BatchPlan` of a run with ``per_device`` images on each of ``world_size``
    processes and ``accumulate`` batches per optimizer step, for an experiment published with
    ``base_batch`` images per step.

    Raises:
        ValueError: an unknown ``remedy``, or ``accumulate`` that cannot reach ``base_batch``
            (not a multiple, or already more per step); the message gives the numbers.
    """
    if remedy not in REMEDIES:
        raise ValueError(f"batch_remedy={remedy!r}: expected one of {', '.join(REMEDIES)}")
    per_step = int(per_device) * int(world_size)
    global_batch = per_step * int(accumulate)
    if base_batch is None or global_batch == int(base_batch):
        return BatchPlan(global_batch, base_batch, accumulate=int(accumulate))
    base = int(base_batch)
    numbers = (f"global batch {global_batch} ({world_size} process(es) x data.batch_size={per_device}"
               f"{f' x accumulate_grad_batches={accumulate}' if accumulate != 1 else ''}), but the published "
               f"numbers were trained with {base}")  # fmt: skip
    if remedy == "none":
        return BatchPlan(global_batch, base, accumulate=int(accumulate), message=(
            f"{numbers}; training as configured (lr and schedule as published). The references' remedies: "
            f"batch_remedy=scale_lr (lr x {global_batch}/{base}, mmengine's auto_scale_lr) or batch_remedy=accumulate "
            f"(gradient accumulation up to {base})"))  # fmt: skip
    if remedy == "scale_lr":
        factor = global_batch / base
        return BatchPlan(global_batch, base, lr_factor=factor, accumulate=int(accumulate),
                         message=f"{numbers}; batch_remedy=scale_lr: lr x {factor:g} (linear scaling)")  # fmt: skip
    if accumulate != 1:
        raise ValueError(f"batch_remedy=accumulate sets the accumulation itself; drop trainer.accumulate_grad_batches="
                         f"{accumulate}")  # fmt: skip
    if base % per_step or per_step > base:
        raise ValueError(
            f"batch_remedy=accumulate: the published global batch {base} is not a whole number of steps of "
            f"{per_step} images ({world_size} process(es) x data.batch_size={per_device}); choose data.batch_size "
            f"so that {world_size} x data.batch_size divides {base}, or use batch_remedy=scale_lr"
        )
    steps = base // per_step
    return BatchPlan(global_batch, base, accumulate=steps, message=(
        f"{numbers}; batch_remedy=accumulate: {steps} batches per optimizer step (global batch {base})"))  # fmt: skip


def apply_global_batch(trainer: Any, module: Any, per_device: int, base_batch: int | None, remedy: str) -> BatchPlan:
    """Checks a training run's global batch against ``base_batch`` and applies ``remedy`` to the
    ``trainer`` (accumulation, validation interval) and the ``module`` (its optimizer's lr), before
    ``fit``. Returns the plan; its message is logged at warning level."""
    plan = plan_global_batch(per_device, int(trainer.world_size), int(trainer.accumulate_grad_batches),
                             base_batch, remedy)  # fmt: skip
    if plan.message:
        log.warning(plan.message)
    if plan.lr_factor != 1.0:
        settings = module.optimizer_settings
        module.optimizer_settings = dataclasses.replace(settings, lr=settings.lr * plan.lr_factor)
    if plan.accumulate != trainer.accumulate_grad_batches:
        steps = plan.accumulate // int(trainer.accumulate_grad_batches)
        trainer.accumulate_grad_batches = plan.accumulate
        # Lightning counts an integer val_check_interval in batches: keep it in optimizer steps
        if isinstance(trainer.val_check_interval, int):
            trainer.val_check_interval *= steps
    return plan
