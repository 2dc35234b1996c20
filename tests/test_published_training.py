"""Training as the published runs trained: the optimizer's parameter groups and clipping equal
MMSegmentation's, the learning-rate schedule follows mmcv 1.x (which trained the published weights)
or, selectably, mmengine (MMSegmentation 1.x), and a run on another number of GPUs knows the
published global batch and applies the references' remedies."""

from __future__ import annotations

import logging
from pathlib import Path

import mmseg_peer as peer
import pytest
import torch
from cli_utils import compose_cfg
from lightning.pytorch import Trainer
from omegaconf import open_dict
from test_convert_mmseg import EXPERIMENTS as CONVERTED

from knet_lightning.checkpoint.convert.backbones import backbone_from_published
from knet_lightning.checkpoint.convert.mapping import convert_state_dict
from knet_lightning.checkpoint.convert.mmseg import MMSEG_SEMANTIC
from knet_lightning.cli import build_datamodule, build_model
from knet_lightning.training.global_batch import apply_global_batch, plan_global_batch
from knet_lightning.training.optim import build_optimizer, warmup_step_lambda

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# MMSegmentation's config -> our experiment (and the overrides that make the network its twin)
EXPERIMENTS = {name: CONVERTED[name] for name in ("upernet", "swin-t")}


def _module(tmp_path: Path, experiment: str, extra: list[str]):  # type: ignore[no-untyped-def]
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", "model.net.pretrained=false", *extra])
    with open_dict(cfg):
        cfg.data.root = str(tmp_path / "no_ade20k")
    return cfg, build_model(cfg, build_datamodule(cfg).class_info)


def _origins(ref: torch.nn.Module, net: torch.nn.Module) -> dict[str, str]:
    """MMSegmentation's parameter name -> ours, as ``mode=convert`` maps them: every tensor of
    ``ref`` filled with its own number goes through the conversion, and each of our tensors
    then names its source (a layout change of the backbone moves values, not their number)."""
    names = list(ref.state_dict())
    state = {k: torch.full_like(v, i + 1) for i, (k, v) in enumerate(ref.state_dict().items())}
    converted = convert_state_dict(
        backbone_from_published(state, net.backbone), net.state_dict(), MMSEG_SEMANTIC, "peer"
    )
    origins = {}
    for ours, tensor in converted.items():
        number = int(tensor.flatten()[0])
        assert bool((tensor == number).all()), ours
        origins[names[number - 1]] = ours
    return origins


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_parameter_groups_and_clipping_equal_mmsegmentations(tmp_path: Path, name: str) -> None:
    from mmengine.optim import build_optim_wrapper

    ref = peer.build_mmseg_knet(name, init="empty")
    cfg_ref = ref.peer_cfg
    wrapper = build_optim_wrapper(ref, cfg_ref.optim_wrapper)
    by_id = {id(p): n for n, p in ref.named_parameters()}
    theirs = {by_id[id(p)]: (g["lr"], g["weight_decay"]) for g in wrapper.optimizer.param_groups for p in g["params"]}

    experiment, extra = EXPERIMENTS[name]
    cfg, module = _module(tmp_path, experiment, extra)
    optimizer = build_optimizer(module.net, module.optimizer_settings)
    names = {id(p): n for n, p in module.net.named_parameters()}
    ours = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}

    assert len(ours) == len(theirs)
    origin = _origins(ref, module.net)
    differing = []
    for key, (lr, decay) in theirs.items():
        got = ours[origin[key]]
        if got != pytest.approx((lr, decay), rel=1e-12, abs=0):
            differing.append(f"{key}: MMSegmentation lr {lr}, wd {decay}; ours lr {got[0]}, wd {got[1]}")
    assert not differing, "\n".join(differing[:20])
    # AdamW's betas, and clipping: the L2 norm of all gradients at 1.0
    assert tuple(optimizer.defaults["betas"]) == tuple(cfg_ref.optim_wrapper.optimizer.get("betas", (0.9, 0.999)))
    clip = cfg_ref.optim_wrapper.clip_grad
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.gradient_clip_algorithm) == (clip.max_norm, "norm")
    assert clip.norm_type == 2


def _lrs(scheduler_factor, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    return [scheduler_factor(i) for i in range(steps)]


def test_mmcv_schedule_is_mmcv_1x_warmup_and_step_policy() -> None:
    """mmcv 1.x (``lr_config=dict(policy='step', warmup='linear', warmup_iters=1000,
    warmup_ratio=0.001, step=[60000, 72000])``): at iteration i < 1000 the lr is
    ``base (1 - (1 - i/1000)(1 - 0.001))``; ``base x 0.1^k`` once i reaches the k-th step."""
    factor = warmup_step_lambda(1000, 0.001, [60000, 72000], 0.1, "mmcv")
    expected = {0: 0.001, 1: 1 - 0.999 * 0.999, 500: 1 - 0.5 * 0.999, 999: 1 - 0.001 * 0.999, 1000: 1.0,
                59999: 1.0, 60000: 0.1, 71999: 0.1, 72000: 0.01, 79999: 0.01}  # fmt: skip
    for step, value in expected.items():
        assert factor(step) == pytest.approx(value, rel=1e-12), step


def test_mmengine_schedule_equals_mmsegmentation_1x_schedulers() -> None:
    """MMSegmentation 1.2.2's ``param_scheduler`` (LinearLR + MultiStepLR) run by mmengine, step by
    step over all 80k iterations, against ``model.scheduler.convention=mmengine``."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    cfg = peer.load_knet_config("upernet")
    wrapper = build_optim_wrapper(
        torch.nn.Linear(1, 1), dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1.0))
    )
    schedulers = [PARAM_SCHEDULERS.build(dict(s), default_args=dict(optimizer=wrapper)) for s in cfg.param_scheduler]
    (warmup, steps) = cfg.param_scheduler
    ours = warmup_step_lambda(warmup["end"], warmup["start_factor"], steps["milestones"], steps.get("gamma", 0.1),
                              "mmengine")  # fmt: skip
    mmcv = warmup_step_lambda(warmup["end"], warmup["start_factor"], steps["milestones"], 0.1, "mmcv")
    differs_from_mmcv = []
    for step in range(steps["end"]):
        theirs = wrapper.optimizer.param_groups[0]["lr"]  # the lr of update `step`
        assert ours(step) == pytest.approx(theirs, rel=1e-9), step
        if mmcv(step) != pytest.approx(theirs, rel=1e-9):
            differs_from_mmcv.append(step)
        wrapper.optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    # the two conventions differ during the warmup and between the milestones' two countings
    assert differs_from_mmcv[0] == 1 and 999 in differs_from_mmcv
    assert {60000, 60999, 72000, 72999} <= set(differs_from_mmcv) and 61000 not in differs_from_mmcv


def test_the_schedule_convention_is_selectable(tmp_path: Path) -> None:
    from knet_lightning.training.optim import SchedulerSettings

    cfg = compose_cfg(tmp_path, ["experiment=knet_upernet_r50_ade20k_80k", "model.scheduler.convention=mmengine"])
    assert cfg.model.scheduler.convention == "mmengine"
    assert compose_cfg(tmp_path, ["experiment=knet_upernet_r50_ade20k_80k"]).model.scheduler.convention == "mmcv"
    with pytest.raises(ValueError, match="model.scheduler.convention='mmdet': expected one of mmcv, mmengine"):
        SchedulerSettings(convention="mmdet")


# ------------------------------------------------------------------ the global batch
@pytest.mark.parametrize(
    ("experiment", "base"),
    [("knet_upernet_r50_ade20k_80k", 16), ("knet_upernet_swin-l_ade20k_80k_640_mmseg", 16),
     ("knet_r50_coco_panoptic_1x", 16), ("knet_r101_dcn_coco_instance_ms3x", 16),
     ("knet_swin-l_coco_panoptic_ms3x", 32), ("knet_upernet_r50_cityscapes_80k", 8), ("synthetic", None)],
)  # fmt: skip
def test_experiments_record_their_published_global_batch(tmp_path: Path, experiment: str, base: int | None) -> None:
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}"])
    assert cfg.base_batch_size == base and cfg.batch_remedy == "none"


def test_global_batch_plans() -> None:
    assert plan_global_batch(2, 8, 1, 16).message == ""
    none = plan_global_batch(2, 2, 1, 16)
    assert (none.global_batch, none.lr_factor, none.accumulate) == (4, 1.0, 1)
    assert "global batch 4 (2 process(es) x data.batch_size=2)" in none.message and "trained with 16" in none.message
    scaled = plan_global_batch(2, 2, 1, 16, "scale_lr")
    assert scaled.lr_factor == pytest.approx(0.25) and scaled.accumulate == 1
    accumulated = plan_global_batch(2, 2, 1, 16, "accumulate")
    assert (accumulated.lr_factor, accumulated.accumulate) == (1.0, 4)
    with pytest.raises(ValueError, match="not a whole number of steps of 6 images"):
        plan_global_batch(2, 3, 1, 16, "accumulate")
    with pytest.raises(ValueError, match="not a whole number"):
        plan_global_batch(4, 8, 1, 16, "accumulate")  # 32 per step: accumulation cannot reach 16
    with pytest.raises(ValueError, match="batch_remedy='halve'"):
        plan_global_batch(2, 2, 1, 16, "halve")
    assert plan_global_batch(2, 1, 3, None, "accumulate").global_batch == 6  # nothing recorded: nothing done


def test_apply_global_batch_to_a_trainer_and_module(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, module = _module(tmp_path, "knet_fcn_r50_ade20k_80k", [])
    lr = module.optimizer_settings.lr
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=10, val_check_interval=8, check_val_every_n_epoch=None,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="knet_lightning.training.global_batch"):
        apply_global_batch(trainer, module, 2, 16, "accumulate")
    assert trainer.accumulate_grad_batches == 8 and trainer.val_check_interval == 64
    assert module.optimizer_settings.lr == lr
    assert (
        "global batch 2 (1 process(es) x data.batch_size=2), but the published numbers were trained with 16"
        in caplog.text
    )

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    apply_global_batch(trainer, module, 2, 16, "scale_lr")
    assert trainer.accumulate_grad_batches == 1
    assert module.optimizer_settings.lr == pytest.approx(lr / 8)
    groups = build_optimizer(module.net, module.optimizer_settings).param_groups
    assert max(g["lr"] for g in groups) == pytest.approx(lr / 8)


def test_a_training_run_reports_and_remedies_its_global_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The CLI applies ``batch_remedy`` to its Trainer: 1 process x 4 images, published 8 -> 2
    batches per optimizer step (2 training batches make 1 step, not 2)."""
    from cli_utils import run_cfg, tiny_overrides

    cfg = compose_cfg(tmp_path, tiny_overrides("base_batch_size=8", "batch_remedy=accumulate", "trainer.max_epochs=1",
                                               "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                                               "test_after_fit=false"))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="knet_lightning"):
        run_cfg(cfg)
    assert (
        "global batch 4 (1 process(es) x data.batch_size=4), but the published numbers were trained with 8; "
        "batch_remedy=accumulate: 2 batches per optimizer step (global batch 8)"
    ) in caplog.text
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1
