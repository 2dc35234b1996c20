"""The optimizer and learning-rate policy of the official K-Net configs.

AdamW (``optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05)``) with the backbone at
``lr_mult=0.25`` (``paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.25)})``), and
mmcv's linear warmup followed by step decay (``lr_config=dict(policy='step', warmup='linear',
warmup_iters=1000, warmup_ratio=0.001, step=[8, 11])``): configs/det/_base_/schedules/ of the
official code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# torch.compile wraps a module and prefixes its parameter names
_COMPILED_PREFIX = "_orig_mod."
IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


@dataclass
class OptimizerSettings:
    """``model.optimizer``: AdamW with a backbone learning-rate multiplier."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # backbone parameters train at lr * backbone_lr_mult (official: 0.25)
    backbone_lr_mult: float = 0.25
    # the official config decays norms and biases too; the mmdet 3.x port sets this to 0
    norm_bias_decay_mult: float = 1.0
    # parameters whose name contains one of these get no weight decay (mmcv's paramwise_cfg
    # custom_keys with decay_mult=0; the Swin configs list relative_position_bias_table and norm)
    no_decay_keys: list[str] = field(default_factory=list)
    # torch's AdamW kernel: fused (one kernel for all parameters), foreach (batched ops),
    # for_loop (one parameter at a time) or auto (fused unless Lightning forbids it: see
    # build_optimizer). Same update rule; on a 2-core CPU the default run's optimizer step
    # takes 21 ms fused, 46 ms foreach and 66 ms for-loop (torch's CPU default).
    implementation: str = "auto"

    def __post_init__(self) -> None:
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"model.optimizer.implementation={self.implementation!r}: expected one of {', '.join(IMPLEMENTATIONS)}"
            )


SCHEDULE_CONVENTIONS = ("mmcv", "mmengine")


@dataclass
class SchedulerSettings:
    """``model.scheduler``: linear warmup, then ``lr *= gamma`` at each milestone.

    ``convention``: whose arithmetic the same numbers follow (:func:`warmup_step_lambda`).
    ``mmcv`` (default): mmcv 1.x's ``lr_config=dict(policy='step', warmup='linear', ...)``, which
    trained the published K-Net weights (official code and MMSegmentation 0.x). ``mmengine``: as
    MMSegmentation 1.x's configs write the schedule, ``LinearLR(start_factor=warmup_ratio, begin=0,
    end=warmup_iters)`` + ``MultiStepLR(begin=warmup_iters, milestones)``: the warmup reaches 1 one
    step earlier and the milestones count from the warmup's end (80k ADE20K: decays at 61k and 73k).
    """

    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    # epoch (converted with the trainer's steps per epoch) or step
    milestone_unit: str = "epoch"
    gamma: float = 0.1
    convention: str = "mmcv"

    def __post_init__(self) -> None:
        if self.milestone_unit not in ("epoch", "step"):
            raise ValueError(f"model.scheduler.milestone_unit={self.milestone_unit!r}: expected 'epoch' or 'step'")
        if self.convention not in SCHEDULE_CONVENTIONS:
            raise ValueError(
                f"model.scheduler.convention={self.convention!r}: expected one of {', '.join(SCHEDULE_CONVENTIONS)}"
            )


def param_groups(net: nn.Module, settings: OptimizerSettings) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: backbone or head, decayed or not (norms and biases).

    Parameter names are read through a ``torch.compile`` wrapper, so a compiled network keeps
    its backbone multiplier.
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_params = {id(p) for m in net.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix(_COMPILED_PREFIX)
        is_backbone = name.startswith("backbone.")
        if any(key in name for key in settings.no_decay_keys):
            decay = 0.0
        elif id(p) in norm_params or name.endswith(".bias"):
            decay = settings.norm_bias_decay_mult
        else:
            decay = 1.0
        groups.setdefault((is_backbone, decay), []).append(p)
    return [
        {
            "params": params,
            "lr": settings.lr * (settings.backbone_lr_mult if is_backbone else 1.0),
            "weight_decay": settings.weight_decay * decay,
            "name": ("backbone" if is_backbone else "head") + ("" if decay == 1.0 else f"_decay_x{decay:g}"),
        }
        for (is_backbone, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    ]


def clips_under_amp(trainer: Any) -> bool:
    """Whether ``trainer`` clips gradients under Lightning's mixed-precision plugin (which
    refuses a fused optimizer there); False without a trainer."""
    if trainer is None:
        return False
    return str(trainer.precision).endswith("-mixed") and bool(trainer.gradient_clip_val)


def build_optimizer(net: nn.Module, settings: OptimizerSettings, clips_under_amp: bool = False) -> torch.optim.AdamW:
    """The package's AdamW over :func:`param_groups`.

    ``clips_under_amp``: the run clips gradients under Lightning's mixed-precision plugin,
    which refuses a fused optimizer (it may unscale gradients inside its step), so ``auto``
    takes foreach there; an explicit ``fused`` is an error naming both settings.
    """
    implementation = settings.implementation
    if implementation == "auto":
        implementation = "foreach" if clips_under_amp else "fused"
    elif implementation == "fused" and clips_under_amp:
        raise ValueError(
            "model.optimizer.implementation=fused cannot run with trainer.gradient_clip_val > 0 under "
            "mixed precision (Lightning refuses clipping with a fused optimizer): use auto or foreach"
        )
    flags = {"fused": implementation == "fused", "foreach": implementation == "foreach"}
    return torch.optim.AdamW(param_groups(net, settings), lr=settings.lr, betas=tuple(settings.betas), **flags)


def warmup_step_lambda(
    warmup_iters: int, warmup_ratio: float, milestones: Sequence[int], gamma: float, convention: str = "mmcv"
) -> Callable[[int], float]:
    """The official lr policy as a multiplicative factor of the (0-based) step count.

    ``mmcv``: linear warmup ``1 - (1 - step / warmup_iters) (1 - warmup_ratio)`` below
    ``warmup_iters`` (mmcv 1.x's ``LrUpdaterHook.get_warmup_lr``), times ``gamma`` per milestone
    reached (``StepLrUpdaterHook``). ``mmengine``: ``warmup_ratio + (1 - warmup_ratio) step /
    (warmup_iters - 1)`` below ``warmup_iters - 1`` (``LinearLR`` of ``end - begin - 1`` steps),
    times ``gamma`` per ``warmup_iters + milestone`` reached (``MultiStepLR`` begun at the
    warmup's end). ``milestones`` are in steps.
    """
    if convention not in SCHEDULE_CONVENTIONS:
        raise ValueError(f"convention must be one of {SCHEDULE_CONVENTIONS}, got {convention!r}")
    offset = warmup_iters if convention == "mmengine" else 0
    sorted_milestones = sorted(int(m) + offset for m in milestones)

    def warmup(step: int) -> float:
        if convention == "mmcv":
            if warmup_iters > 0 and step < warmup_iters:
                return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
            return 1.0
        if warmup_iters > 1 and step < warmup_iters - 1:
            return warmup_ratio + (1.0 - warmup_ratio) * step / (warmup_iters - 1)
        return 1.0

    def factor(step: int) -> float:
        return gamma ** sum(step >= m for m in sorted_milestones) * warmup(step)

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: SchedulerSettings, steps_per_epoch: Callable[[], float]
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``; epoch milestones become steps through ``steps_per_epoch()``."""
    milestones = list(settings.milestones)
    if settings.milestone_unit == "epoch" and milestones:
        per_epoch = steps_per_epoch()
        milestones = [int(round(m * per_epoch)) for m in milestones]
    factor = warmup_step_lambda(settings.warmup_iters, settings.warmup_ratio, milestones, settings.gamma,
                                settings.convention)  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
