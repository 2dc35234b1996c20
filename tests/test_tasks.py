"""The task objects (knet_lightning.tasks) and the KNetModule that calls them: typed settings,
ground truth, metrics per stage, overlays, writers, and the module's optimizer wiring."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from cli_utils import compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from knet_lightning.criterion import KNetCriterion
from knet_lightning.models.knet import KNet
from knet_lightning.module import KNetModule
from knet_lightning.tasks import (
    TASKS,
    InstanceSettings,
    PanopticSettings,
    PanopticTask,
    SemanticTask,
    build_task,
)
from knet_lightning.training.optim import OptimizerSettings, build_optimizer

SRC = Path(__file__).resolve().parents[1] / "src" / "knet_lightning"


def _net(**kw: object) -> KNet:
    cfg: dict[str, object] = dict(num_things=3, num_stuff=2, num_proposals=6, num_stages=2, backbone_depth=18,
                                  channels=32, num_groups=8, feedforward_channels=64, num_heads=4)  # fmt: skip
    cfg.update(kw)
    return KNet(**cfg)  # type: ignore[arg-type]


def _module(**kw: object) -> KNetModule:
    net = _net()
    return KNetModule(net, KNetCriterion(3, 2), **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ settings


def test_unknown_postprocess_key_names_it_and_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"objct_mask_thr.*valid keys: \['object_mask_thr', 'overlap_thr', "
                                         r"'mask_thr', 'method'\]"):  # fmt: skip
        PanopticSettings.from_config({"objct_mask_thr": 0.2})
    # instance settings have no panoptic merge keys (they used to be silently accepted)
    with pytest.raises(ValueError, match=r"object_mask_thr.*valid keys: \['max_per_img', 'mask_thr'\]"):
        InstanceSettings.from_config({"object_mask_thr": 0.3})
    with pytest.raises(ValueError, match="unknown key"):
        _module(postprocess={"overlap_threshold": 0.5})


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"method": "fast"}, "method='fast'"), ({"overlap_thr": 1.5}, r"overlap_thr=1.5: expected a value in \[0, 1\]"),
     ({"mask_thr": -0.1}, "mask_thr=-0.1")],
)  # fmt: skip
def test_bad_postprocess_values_fail_when_the_module_is_built(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _module(postprocess=settings)


def test_unknown_optimizer_or_scheduler_key_fails() -> None:
    with pytest.raises(ValueError, match=r"model.optimizer: unknown key\(s\) \['learning_rate'\]"):
        _module(optimizer={"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="milestone_unit='epochs'"):
        _module(scheduler={"milestone_unit": "epochs"})


def test_misspelled_postprocess_key_in_a_config_fails_at_composition(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="objct_mask_thr"):
        compose_cfg(tmp_path, ["model.postprocess.objct_mask_thr=0.2"])
    # an experiment file's keys merge into the typed node: a misspelled one is refused
    node = compose_cfg(tmp_path, []).model.postprocess
    with pytest.raises(ConfigKeyError, match="objct_mask_thr"):
        OmegaConf.merge(node, {"objct_mask_thr": 0.2})
    with pytest.raises(ValidationError, match="overlap_thr"):
        OmegaConf.merge(node, {"overlap_thr": "high"})
    cfg = compose_cfg(tmp_path, ["model=knet_instance", "~experiment"])
    assert dict(cfg.model.postprocess) == {"max_per_img": 100, "mask_thr": 0.5}  # the dataclass defaults
    cfg = compose_cfg(tmp_path, ["model.postprocess.method=dense"])
    assert cfg.model.postprocess.method == "dense" and cfg.model.postprocess.object_mask_thr == 0.3


# ------------------------------------------------------------------ one source for N and S


def test_num_proposals_and_num_stages_come_from_the_network() -> None:
    module = _module()
    assert (module.num_proposals, module.num_stages) == (6, 2)
    assert (module.task.num_proposals, module.task.num_stages) == (6, 2)
    assert module.task.eval_stages == [1, 2]
    # the criterion of the configs has no num_proposals: it reads P off the outputs
    out = module.net.eval()(torch.randn(1, 3, 64, 64))
    assert module.criterion.instance_kernels(out[0]) == 6


def test_the_config_gives_num_proposals_to_the_network_only(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, ["model.num_proposals=7"])
    assert cfg.model.net.num_proposals == 7 and "num_proposals" not in cfg.model.criterion


# ------------------------------------------------------------------ bugs of the old module


def test_compile_keeps_the_backbone_learning_rate_multiplier() -> None:
    module = _module(
        compile=True,
        optimizer={"lr": 1e-3, "backbone_lr_mult": 0.25},
        scheduler={"milestones": [100], "milestone_unit": "step"},
    )
    names = [n for n, _ in module.named_parameters()]
    assert not any("_orig_mod" in n for n in names)
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    assert groups["backbone"]["initial_lr"] == pytest.approx(2.5e-4)
    assert groups["head"]["initial_lr"] == pytest.approx(1e-3)


def test_param_groups_read_through_a_torch_compile_wrapper() -> None:
    net = _net()
    plain = {g["name"]: len(g["params"]) for g in build_optimizer(net, OptimizerSettings()).param_groups}
    compiled = {
        g["name"]: len(g["params"]) for g in build_optimizer(torch.compile(net), OptimizerSettings()).param_groups
    }
    assert plain == compiled and plain["backbone"] > 0


def test_overlay_uses_the_batch_normalisation_not_imagenet() -> None:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    image = torch.full((1, 3, 32, 32), 0.4)  # normalised: 0.4 * 0.25 + 0.5 = 0.6 -> 153
    batch = {"images": image, "image_sizes": [(32, 32)], "mean": mean, "std": std}
    from knet_lightning.postprocess.visualize import denormalized_image

    out = denormalized_image(batch, 0, (32, 32))
    assert out.dtype == torch.uint8 and int(out[0, 0, 0]) == 153


# ------------------------------------------------------------------ tasks


def test_panoptic_ground_truth_and_metrics_per_stage() -> None:
    task = build_task("panoptic", num_classes=3, num_things=2, num_proposals=4, num_stages=2)
    seg = torch.tensor([[1, 1, 2], [3, 3, 0]], dtype=torch.int32)
    target = {"panoptic": seg, "labels": torch.tensor([0, 1, 2]), "iscrowd": torch.tensor([False, True, False])}
    gt_seg, segments, sem = task.ground_truth(target)
    assert [s["iscrowd"] for s in segments] == [False, True, False]
    assert sem.tolist() == [[0, 0, 1], [2, 2, 255]]  # crowd keeps its class, void ignored
    perfect = (seg, [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 2}])
    task.update("val", 1, [perfect], [(gt_seg, segments, sem)], [target])
    task.update("val", 2, [perfect], [(gt_seg, segments, sem)], [target])
    values = task.compute("val")
    assert values["val/pq_s1"] == pytest.approx(100.0) and values["val/pq"] == pytest.approx(100.0)
    assert values["val/miou"] == pytest.approx(100.0)
    # computing resets
    task.update("val", 2, [(torch.zeros_like(seg), [])], [(gt_seg, segments, sem)], [target])
    assert task.compute("val")["val/pq"] == pytest.approx(0.0)


def test_panoptic_miou_counts_crowd_pixels_with_their_class() -> None:
    task = build_task("panoptic", num_classes=3, num_things=2, num_proposals=4, num_stages=1)
    # person (class 0) and a crowd of cars (class 1); -1: an id the JSON does not list
    seg = torch.tensor([[1, 1, 2, 2, -1]], dtype=torch.int32)
    target = {"panoptic": seg, "labels": torch.tensor([0, 1]), "iscrowd": torch.tensor([False, True])}
    gt = task.ground_truth(target)
    assert gt[2].tolist() == [[0, 0, 1, 1, 255]]
    # one person segment over the person and the crowd. Crowd counted (the references):
    # person IoU 2/4, car IoU 0/2, mIoU 25. Crowd ignored it would be person 2/2, mIoU 100.
    pred = (torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.int32), [{"id": 1, "category_id": 0}])
    task.update("test", 1, [pred], [gt], [target])
    assert float(task.compute("test")["test/miou"]) == pytest.approx(25.0)


def test_semantic_task_scores_every_depth_from_stage_zero() -> None:
    task = build_task("semantic", num_classes=2, num_things=0, num_proposals=2, num_stages=1)
    assert isinstance(task, SemanticTask) and task.eval_stages == [0, 1]
    gt = torch.tensor([[0, 1], [1, 255]])
    task.update("val", 0, [torch.tensor([[0, 0], [1, 1]])], [gt], [{}])
    task.update("val", 1, [gt.clamp(max=1)], [gt], [{}])
    values = task.compute("val")
    assert values["val/miou_s1"] == pytest.approx(100.0) and values["val/miou"] == pytest.approx(100.0)
    # stage 0: class 0 IoU 1/2 (one of two predicted pixels right), class 1 IoU 1/2
    assert values["val/miou_s0"] == pytest.approx(50.0)


def test_instance_ground_truth_from_a_panoptic_reader_keeps_things_only() -> None:
    task = build_task("instance", num_classes=2, num_things=2, num_proposals=3, num_stages=1)
    seg = torch.tensor([[1, 2], [3, 3]], dtype=torch.int32)
    gt = task.ground_truth({"panoptic": seg, "labels": torch.tensor([0, 2, 1]),
                            "iscrowd": torch.tensor([False, False, True])})  # fmt: skip
    assert gt["labels"].tolist() == [0, 1] and gt["iscrowd"].tolist() == [False, True]
    assert gt["area"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_draws_its_overlay_and_class_map(name: str) -> None:
    task = build_task(name, num_classes=3, num_things=2 if name != "semantic" else 0, num_proposals=4, num_stages=1)
    image = torch.full((3, 4, 5), 100, dtype=torch.uint8)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    if name == "panoptic":
        seg = torch.zeros(4, 5, dtype=torch.int32)
        seg[:2] = 7
        pred = (seg, [{"id": 7, "category_id": 1}])
    elif name == "instance":
        masks = torch.zeros(2, 4, 5, dtype=torch.bool)
        masks[0, :2] = True
        masks[1, 2:] = True
        pred = {"masks": masks, "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 0])}
    else:
        pred = torch.full((4, 5), 255, dtype=torch.int64)
        pred[:2] = 1
    overlay = task.overlay(image, pred, colors)
    assert overlay.shape == (3, 4, 5) and overlay.dtype == torch.uint8
    assert not torch.equal(overlay[:, :2], image[:, :2]) and torch.equal(overlay[:, 2:], image[:, 2:])
    class_map = task.class_map(pred)
    assert class_map[:2].eq(2).all() and class_map[2:].eq(0).all()  # class 1 -> 2; the rest nothing


# ------------------------------------------------------------------ layout


def test_a_stage_count_without_a_prediction_is_refused_by_the_module_naming_the_key() -> None:
    """Issue 27: a K-Net whose network has no kernel update stage used to train and then fail at the
    test step (stage 0 has no classifier); the module refuses it, as it does no kernels. The
    semantic task's stage 0 is the decode head's prediction: 0 stages is a model, -1 is not."""
    with pytest.raises(ValueError, match=r"model.num_stages=0: expected an integer >= 1 \(stage 0 has no classifier"):
        KNetModule(_net(num_stages=0), KNetCriterion(3, 2))
    for name in ("panoptic", "instance"):
        with pytest.raises(ValueError, match=rf"model.num_stages=0: .*the {name} task predicts from the kernel upd"):
            build_task(name, num_classes=3, num_things=2, num_proposals=4, num_stages=0)
    with pytest.raises(ValueError, match=r"model.num_proposals=0: expected an integer >= 1"):
        build_task("panoptic", num_classes=3, num_things=2, num_proposals=0, num_stages=1)
    assert build_task("semantic", num_classes=3, num_things=0, num_proposals=3, num_stages=0).eval_stages == [0]
    with pytest.raises(ValueError, match=r"model.num_stages=-1: expected an integer >= 0 \(0 is the decode head"):
        build_task("semantic", num_classes=3, num_things=0, num_proposals=3, num_stages=-1)


def test_no_task_branch_outside_tasks_and_short_modules() -> None:
    pattern = re.compile(r"""task\s*(==|!=|in)\s*[("']""")
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        assert len(path.read_text().splitlines()) <= 600, f"{rel} is over 600 lines"
        if rel.parts[0] == "tasks":
            continue
        offenders += [f"{rel}:{i + 1}" for i, line in enumerate(path.read_text().splitlines()) if pattern.search(line)]
    assert offenders == []
    assert len((SRC / "module.py").read_text().splitlines()) < 250
    assert isinstance(build_task("panoptic", num_classes=3, num_things=2, num_proposals=2, num_stages=1), PanopticTask)


def test_overlay_callback_draws_the_task_overlay_without_data_set_colours(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from knet_lightning.training.callbacks import PredictionOverlays

    module = _module()  # no class colours given: the default palette
    assert module.colors is None
    seg = torch.zeros(8, 8, dtype=torch.int32)
    seg[:4] = 3
    sample = {"file_name": "img.jpg", "image": torch.full((3, 8, 8), 90, dtype=torch.uint8),
              "prediction": (seg, [{"id": 3, "category_id": 4}])}  # fmt: skip
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=2, default_root_dir=str(tmp_path), loggers=[],
                              global_step=5)  # fmt: skip
    callback = PredictionOverlays(dirname="overlays")
    callback.on_validation_epoch_start(trainer, module)
    # the samples come from the validation step's outputs, never from the module
    callback.on_validation_batch_end(trainer, module, {"vis": [sample]}, batch={}, batch_idx=0)
    assert not hasattr(module, "vis_samples")
    callback.on_validation_epoch_end(trainer, module)
    (png,) = (tmp_path / "overlays" / "epoch_002").glob("*.png")
    assert png.name == "00_img.png"


def test_overlay_callback_collects_num_vis_images_from_the_step_outputs(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from knet_lightning.training.callbacks import PredictionOverlays

    module = _module()
    module.num_vis_images = 3
    seg = torch.zeros(8, 8, dtype=torch.int32)

    def sample(name: str) -> dict:
        return {"file_name": name, "image": torch.zeros((3, 8, 8), dtype=torch.uint8), "prediction": (seg, [])}

    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, default_root_dir=str(tmp_path), loggers=[],
                              global_step=1)  # fmt: skip
    callback = PredictionOverlays(dirname="overlays")
    callback.on_validation_epoch_start(trainer, module)
    callback.on_validation_batch_end(trainer, module, {"vis": [sample("a.jpg"), sample("b.jpg")]}, {}, 0)
    callback.on_validation_batch_end(trainer, module, None, {}, 1)  # a step without outputs
    callback.on_validation_batch_end(trainer, module, {"vis": [sample("c.jpg"), sample("d.jpg")]}, {}, 2)
    assert [s["file_name"] for s in callback.samples] == ["a.jpg", "b.jpg", "c.jpg"]
    callback.on_validation_epoch_end(trainer, module)
    assert sorted(p.name for p in (tmp_path / "overlays" / "epoch_000").glob("*.png")) == [
        "00_a.png",
        "01_b.png",
        "02_c.png",
    ]
    assert callback.samples == []  # the next epoch starts afresh
