"""The paper's experiment configs (conf/experiment/) and end-to-end CLI runs on every data set.

Each experiment must compose with the official configs' settings and a header naming the paper's
number; then each data set trains through the CLI on its fixture (written in the real on-disk layout
by the reader tests' writers), with the experiment's schedule and pipeline but a tiny network and
tiny image sizes, and ``mode=eval`` with ``export_predictions=true`` scores the checkpoint and writes
the official-format files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_utils import TINY_DATA, TINY_MODEL, compose_cfg, run_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils
from test_ade20k import _write_fixture as write_ade20k
from test_cityscapes import SPLITS as CS_SPLITS
from test_cityscapes import H as CS_H
from test_cityscapes import W as CS_W
from test_cityscapes import _write_fixture as write_cityscapes
from test_coco_instance import _write_fixture as write_coco_instance
from test_coco_panoptic import _write_fixture as write_coco_panoptic
from torchvision import tv_tensors

from knet_lightning.cli import build_datamodule, config_dir
from knet_lightning.data.io import rgb2id
from knet_lightning.data.transforms import ResizeShortestEdge

CONF = Path(config_dir())

# experiment -> (data config, model task, optimized metric, paper number or None, the number's metric)
PAPER = {
    "knet_r50_coco_panoptic_1x": ("coco_panoptic", "panoptic", "val/pq", 44.3, "PQ"),
    "knet_r50_coco_panoptic_ms3x": ("coco_panoptic", "panoptic", "val/pq", 47.1, "PQ"),
    "knet_r50_coco_instance_1x": ("coco_instance", "instance", "val/map", 34.0, "mask AP"),
    "knet_r50_coco_instance_ms3x": ("coco_instance", "instance", "val/map", 37.8, "mask AP"),
    "knet_r101_coco_panoptic_ms3x": ("coco_panoptic", "panoptic", "val/pq", 48.4, "PQ"),
    "knet_r101_coco_instance_ms3x": ("coco_instance", "instance", "val/map", 39.2, "mask AP"),
    "knet_fcn_r50_ade20k_80k": ("ade20k", "semantic", "val/miou", 43.3, "mIoU"),
    "knet_upernet_r50_ade20k_80k": ("ade20k", "semantic", "val/miou", 43.6, "mIoU"),
    "knet_pspnet_r50_ade20k_80k": ("ade20k", "semantic", "val/miou", 43.9, "mIoU"),
    "knet_deeplabv3_r50_ade20k_80k": ("ade20k", "semantic", "val/miou", 44.6, "mIoU"),
    "knet_upernet_r50_cityscapes_80k": ("cityscapes_semantic", "semantic", "val/miou", None, None),
    "knet_r101_dcn_coco_panoptic_ms3x": ("coco_panoptic", "panoptic", "val/pq", 49.6, "PQ"),
    "knet_r101_dcn_coco_instance_ms3x": ("coco_instance", "instance", "val/map", 40.5, "mask AP"),
    "knet_swin-l_coco_panoptic_ms3x": ("coco_panoptic", "panoptic", "val/pq", 54.6, "PQ"),
    "knet_upernet_swin-t_ade20k_80k": ("ade20k", "semantic", "val/miou", 45.4, "mIoU"),
    "knet_upernet_swin-l_ade20k_80k": ("ade20k", "semantic", "val/miou", 52.0, "mIoU"),
    "knet_upernet_swin-l_ade20k_80k_640": ("ade20k", "semantic", "val/miou", 52.7, "mIoU"),
    # MMSegmentation 1.x's ports of the three (its metafile's numbers)
    "knet_upernet_swin-t_ade20k_80k_mmseg": ("ade20k", "semantic", "val/miou", 45.84, "mIoU"),
    "knet_upernet_swin-l_ade20k_80k_mmseg": ("ade20k", "semantic", "val/miou", 52.05, "mIoU"),
    "knet_upernet_swin-l_ade20k_80k_640_mmseg": ("ade20k", "semantic", "val/miou", 52.21, "mIoU"),
    "knet_r50_cityscapes_panoptic_90k": ("cityscapes_panoptic", "panoptic", "val/pq", None, None),
}

# the labelIds of Cityscapes' 19 evaluated classes (trainIds 0..18)
CS_LABEL_IDS = {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
LOADER = ["data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false"]
# the semantic K-Net at toy width: 150 (ADE20K) or 19 (Cityscapes) class kernels of 32 channels
TINY_SEMANTIC = [
    "model.num_stages=1",
    "model.net.pretrained=false",
    "model.net.channels=32",
    "model.net.updator_channels=32",
    "model.net.aux_channels=16",
    "model.net.feedforward_channels=64",
    "model.net.num_heads=2",
]
# iteration-based schedules (ADE20K, Cityscapes): 2 steps over 2 one-batch epochs, validation (and the
# checkpoint) at global step 2. One full batch of 2 per epoch: UPerNet's pool-scale-1 branch needs more
# than one image per BatchNorm in training, and the fixtures' 3 images would leave a batch of 1.
TWO_ITERATIONS = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=1",
    "data.batch_size=2",
]


OWN_DATA = ("own_panoptic", "own_instance", "own_semantic")


def test_every_experiment_file_is_covered() -> None:
    # the paper's settings here; the own-data ones (own_*) are tested in test_own_data.py
    on_disk = {p.stem for p in (CONF / "experiment").glob("*.yaml")} - {"synthetic", *OWN_DATA}
    assert on_disk == set(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_experiment_composes_with_the_paper_settings(tmp_path: Path, name: str) -> None:
    data, task, metric, number, what = PAPER[name]
    header = (CONF / "experiment" / f"{name}.yaml").read_text().split("defaults:")[0]
    assert header.startswith("# @package _global_\n")
    if number is not None:
        assert re.search(rf"{re.escape(what)} {number}\b", header), f"{name}: header lacks '{what} {number}'"
    else:  # Cityscapes: K-Net reported none, and the header must say so and what it follows
        assert "no Cityscapes result" in header and "This setting is ours" in header
    assert f"experiment={name} trainer=ddp" in header  # the documented multi-GPU command

    cfg = compose_cfg(tmp_path, [f"experiment={name}"])
    assert cfg.optimized_metric == metric
    assert cfg.callbacks.model_checkpoint.monitor == metric
    assert cfg.model.task == task
    assert (
        OmegaConf.to_container(cfg.data)["_target_"]
        == OmegaConf.to_container(compose_cfg(tmp_path, [f"data={data}", "~experiment"]).data)["_target_"]
    )
    net, opt, sch = cfg.model.net, cfg.model.optimizer, cfg.model.scheduler
    swin = "swin" in name
    assert net.backbone_type == ("swin" if swin else "resnet") and net.pretrained is True
    if swin:  # the official Swin configs: window 7, stochastic depth per config
        assert net.swin_arch == ("large" if "swin-l" in name else "tiny") and net.swin_window_size == 7
        drop = 0.2 if task == "panoptic" else 0.4 if "_640" in name else 0.3
        assert net.drop_path_rate == pytest.approx(drop) and net.frozen_stages == -1
    else:
        assert net.backbone_depth == (101 if "_r101_" in name else 50)
        dcn = "_dcn_" in name  # mmdet's stage_with_dcn=(False, True, True, True)
        assert list(net.backbone_dcn_stages) == [False, dcn, dcn, dcn]
    assert cfg.model.num_stages == 3
    assert opt.lr == pytest.approx(6e-5 if swin and task == "semantic" else 1e-4)
    assert (sch.warmup_iters, sch.warmup_ratio, sch.gamma) == (1000, pytest.approx(0.001), pytest.approx(0.1))
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.gradient_clip_algorithm) == (1.0, "norm")
    assert cfg.data.batch_size == 2  # per GPU; x8 GPUs (x4 for Cityscapes semantic) under trainer=ddp
    if task in ("panoptic", "instance"):
        assert cfg.model.num_proposals == 100 and net.channels == 256
        assert (opt.weight_decay, opt.backbone_lr_mult) == (pytest.approx(0.05), pytest.approx(0.25))
        assert swin or (net.frozen_stages, net.norm_eval) == (1, True)
    else:
        assert (opt.weight_decay, opt.backbone_lr_mult) == (pytest.approx(5e-4), 1.0)
        head = {"fcn": "fcn", "pspnet": "psp", "deeplabv3": "aspp", "upernet": "uper"}[name.split("_")[1]]
        # ResNetV1c, as the official configs
        assert net.decode_head == head and net.deep_stem is not swin
        assert net.channels == (256 if head == "uper" and not name.endswith("_mmseg") else 512)
        # the Swin configs' paramwise_cfg: no decay on the bias tables and norms
        assert list(opt.no_decay_keys) == (
            ["absolute_pos_embed", "relative_position_bias_table", "norm"] if swin else []
        )
        if data == "ade20k":
            crop = 640 if "_640" in name else 512
            assert (list(cfg.data.img_scale), cfg.data.crop_size) == ([2048, crop], crop)
    if "_coco_" in name:
        ms3x = name.endswith("ms3x")
        assert cfg.trainer.max_epochs == (36 if ms3x else 12)
        assert list(sch.milestones) == ([27, 33] if ms3x else [8, 11]) and sch.milestone_unit == "epoch"
        assert cfg.data.train_kind == ("multiscale" if ms3x else "resize")
        assert OmegaConf.to_container(cfg.data)["train_short_edge"] == ([640, 800] if ms3x else 800)
        assert (cfg.data.train_max_size, cfg.data.eval_short_edge, cfg.data.eval_max_size) == (1333, 800, 1333)
    else:  # iteration schedules: no epoch limit
        assert cfg.trainer.max_epochs == -1 and cfg.trainer.check_val_every_n_epoch is None
        assert sch.milestone_unit == "step"
        steps = {"ade20k": (80000, [60000, 72000]), "cityscapes_semantic": (80000, [60000, 72000]),
                 "cityscapes_panoptic": (90000, [60000, 82500])}[data]  # fmt: skip
        assert (cfg.trainer.max_steps, list(sch.milestones)) == steps
    # the trainer builds from the composed config (on CPU here; trainer=ddp needs GPUs)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.get("max_steps", -1)


def test_experiment_composes_with_ddp_trainer(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, ["experiment=knet_r50_coco_panoptic_1x", "trainer=ddp"])
    # every device of the node: NCCL over the GPUs, or gloo on a node without one (Lightning picks)
    assert cfg.trainer.strategy.process_group_backend is None
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("auto", "auto")
    assert cfg.trainer.max_epochs == 12 and cfg.data.batch_size == 2


@pytest.mark.parametrize("name", ["knet_r50_coco_panoptic_ms3x", "knet_r50_coco_instance_ms3x"])
def test_ms3x_pipeline_draws_the_short_side_from_640_800(tmp_path: Path, name: str) -> None:
    cfg = compose_cfg(tmp_path, [f"experiment={name}", *LOADER])
    dm = build_datamodule(cfg)  # the readers open files only at setup
    (resize,) = [t for t in dm.train_transforms.transforms if isinstance(t, ResizeShortestEdge)]
    assert tuple(resize.short_edge) == (640, 800) and resize.max_size == 1333
    image = tv_tensors.Image(torch.zeros(3, 480, 640, dtype=torch.uint8))
    shorts = {min(resize.make_params([image])["size"]) for _ in range(40)}
    assert min(shorts) >= 640 and max(shorts) <= 800 and len(shorts) > 5
    (eval_resize,) = [t for t in dm.eval_transforms.transforms if isinstance(t, ResizeShortestEdge)]
    assert tuple(eval_resize.short_edge) == (800, 800)  # single-scale test


def _coco_fixture(tmp_path: Path, task: str) -> tuple[Path, list[str]]:
    """The reader tests' COCO fixture and the overrides that fit the experiment to it."""
    root = tmp_path / "coco"
    if task == "panoptic":
        write_coco_panoptic(root)  # val split only (a, b, c): it serves as the training split too
        # its images are under the 32 px that training drops; filter_empty_train leaves image a. No
        # class count is typed: the JSON's categories (2 things, 2 stuff) give them
        counts = ["data.train_split=val", "data.filter_min_size_train=0"]
    else:
        write_coco_instance(root, split="train")
        write_coco_instance(root, split="val")
        # its images are under the 32 px that training drops; filter_empty_train leaves a and c
        counts = ["data.filter_min_size_train=0"]  # 3 thing classes, from the JSON
    sizes = ["data.train_max_size=64", "data.eval_short_edge=32", "data.eval_max_size=64", "data.val_batch_size=3"]
    return root, [f"data.root={root}", *LOADER, *counts, *sizes, *TINY_MODEL, "model.net.pretrained=false"]


@pytest.mark.parametrize(("name", "task"), [("knet_r50_coco_panoptic_ms3x", "panoptic"),
                                            ("knet_r50_coco_instance_ms3x", "instance")])  # fmt: skip
def test_ms3x_fast_dev_run(tmp_path: Path, name: str, task: str) -> None:
    _, overrides = _coco_fixture(tmp_path, task)
    cfg = compose_cfg(tmp_path, [f"experiment={name}", "debug=fast_dev_run", *overrides,
                                 "data.train_short_edge=[24,40]"])  # fmt: skip
    assert cfg.data.train_kind == "multiscale" and cfg.trainer.max_epochs == 1
    run_cfg(cfg)
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()


# ------------------------------------------------------------------------------ end to end


def _run_train_then_eval(tmp_path: Path, overrides: list[str]) -> tuple[dict[str, float], dict[str, float], Path]:
    """Trains (``debug=limit``: a checkpoint), then ``mode=eval`` of last.ckpt with export."""
    cfg = compose_cfg(tmp_path / "train", ["debug=limit", *overrides])
    value = run_cfg(cfg)
    run_dir = tmp_path / "train" / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), "the training run wrote no last.ckpt"
    train_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert value == pytest.approx(train_metrics[cfg.optimized_metric])

    cfg = compose_cfg(tmp_path / "eval", [*overrides, f"ckpt_path={last}", "export_predictions=true"],
                      config_name="eval")  # fmt: skip
    run_cfg(cfg)
    eval_metrics = json.loads((tmp_path / "eval" / "run" / "metrics.json").read_text())
    return train_metrics, eval_metrics, tmp_path / "eval" / "run" / "predictions"


def _check_panoptic_export(out: Path, file_names: list[str], sizes: dict[str, tuple[int, int]],
                           category_ids: set[int]) -> None:  # fmt: skip
    data = json.loads((out / "panoptic.json").read_text())
    assert sorted(a["file_name"] for a in data["annotations"]) == sorted(file_names)
    assert {c["id"] for c in data["categories"]} == category_ids
    for ann in data["annotations"]:
        png = np.array(Image.open(out / "panoptic" / ann["file_name"]).convert("RGB"))
        assert png.shape[:2] == sizes[ann["file_name"]]
        ids = set(np.unique(rgb2id(png)).tolist()) - {0}
        assert ids == {s["id"] for s in ann["segments_info"]}
        assert all(s["category_id"] in category_ids for s in ann["segments_info"])


def test_coco_panoptic_1x_trains_and_evaluates(tmp_path: Path) -> None:
    _, overrides = _coco_fixture(tmp_path, "panoptic")
    overrides = ["experiment=knet_r50_coco_panoptic_1x", *overrides, "data.train_short_edge=32"]
    train, evaluated, out = _run_train_then_eval(tmp_path, overrides)
    assert {"val/pq", "val/pq_th", "val/pq_st", "test/pq", "test/miou"} <= set(train)
    # the counts the JSON gave are in the run's record (the data config leaves them null)
    resolved = OmegaConf.load(tmp_path / "train" / "run" / "config_resolved.yaml")
    assert (resolved.data.num_things, resolved.data.num_stuff, resolved.data.num_classes) == (2, 2, 4)
    assert (resolved.model.net.num_things, resolved.model.net.num_stuff) == (2, 2)
    assert evaluated["test/pq"] == pytest.approx(train["test/pq"], abs=1e-6)
    sizes = {"a.png": (24, 32), "b.png": (16, 20), "c.png": (16, 16)}
    _check_panoptic_export(out, list(sizes), sizes, {3, 5, 7, 12})


def test_coco_instance_1x_trains_and_evaluates(tmp_path: Path) -> None:
    _, overrides = _coco_fixture(tmp_path, "instance")
    overrides = ["experiment=knet_r50_coco_instance_1x", *overrides, "data.train_short_edge=32"]
    train, evaluated, out = _run_train_then_eval(tmp_path, overrides)
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large"):
        assert f"test/{key}" in train and f"val/{key}" in train
    assert evaluated["test/map"] == pytest.approx(train["test/map"], abs=1e-6)
    results = json.loads((out / "instances.json").read_text())
    # top-k per image with N=6 kernels x 3 classes: 18 (kernel, class) pairs, capped by max_per_img
    assert results and {r["image_id"] for r in results} == {1, 2, 3}
    assert {r["category_id"] for r in results} <= {18, 1, 3}
    sizes = {1: [24, 32], 2: [16, 20], 3: [16, 16]}
    for r in results:
        assert r["segmentation"]["size"] == sizes[r["image_id"]] and 0.0 <= r["score"] <= 1.0
        mask_utils.decode(r["segmentation"])  # valid compressed RLE


# the UPerNet experiment trains (from converted weights), evaluates and exports in test_convert.py
@pytest.mark.parametrize("name", ["knet_fcn_r50_ade20k_80k"])
def test_ade20k_trains_and_evaluates(tmp_path: Path, name: str) -> None:
    write_ade20k(tmp_path / "ade")
    fcn = "fcn" in name
    overrides = [
        f"experiment={name}", f"data.root={tmp_path / 'ade'}", *LOADER,
        "data.img_scale=[64,32]", "data.crop_size=32", *TINY_SEMANTIC, *TWO_ITERATIONS,
        # FCN needs a Bottleneck ResNet (dilation); 64-wide kernels run through a 32-wide updator in halves
        *(["model.net.backbone_depth=50", "model.net.channels=64"] if fcn else ["model.net.backbone_depth=18"]),
    ]  # fmt: skip
    train, evaluated, out = _run_train_then_eval(tmp_path, overrides)
    assert {"val/miou", "val/acc", "val/miou_s0", "val/miou_s1", "test/miou"} <= set(train)
    assert evaluated["test/miou"] == pytest.approx(train["test/miou"], abs=1e-6)
    (png,) = sorted((out / "semantic").glob("*.png"))
    assert png.name == "ADE_val_00000001.png"
    label = np.array(Image.open(png))
    # original size, ADE20K's own ids 1..150 (0 = other), as the official evaluation reads them
    assert label.shape == (20, 16) and 1 <= label.min() and label.max() <= 150


def test_cityscapes_semantic_trains_and_evaluates(tmp_path: Path) -> None:
    write_cityscapes(tmp_path / "cityscapes")
    overrides = [
        "experiment=knet_upernet_r50_cityscapes_80k", f"data.root={tmp_path / 'cityscapes'}", *LOADER,
        "data.crop_size=[16,32]", "data.scale_range=[0.5,1.0]", "data.val_batch_size=3",
        *TINY_SEMANTIC, "model.net.backbone_depth=18", *TWO_ITERATIONS,
    ]  # fmt: skip
    train, evaluated, out = _run_train_then_eval(tmp_path, overrides)
    assert {"val/miou", "test/miou"} <= set(train)
    assert evaluated["test/miou"] == pytest.approx(train["test/miou"], abs=1e-6)
    pngs = sorted(p.name for p in (out / "semantic").glob("*.png"))
    assert pngs == sorted(f"{s}_leftImg8bit.png" for s in CS_SPLITS["val"])
    for name in pngs:
        label = np.array(Image.open(out / "semantic" / name))
        # full resolution, Cityscapes labelIds (what evalPixelLevelSemanticLabeling reads), not trainIds
        assert label.shape == (CS_H, CS_W) and set(np.unique(label).tolist()) <= CS_LABEL_IDS


def test_cityscapes_panoptic_trains_and_evaluates(tmp_path: Path) -> None:
    write_cityscapes(tmp_path / "cityscapes")
    overrides = [
        "experiment=knet_r50_cityscapes_panoptic_90k", f"data.root={tmp_path / 'cityscapes'}", *LOADER,
        "data.crop_size=[16,32]", "data.scale_range=[0.5,1.0]", "data.val_batch_size=3",
        *TINY_MODEL, "model.net.pretrained=false", *TWO_ITERATIONS,
    ]  # fmt: skip
    train, evaluated, out = _run_train_then_eval(tmp_path, overrides)
    assert {"val/pq", "test/pq", "test/pq_th", "test/pq_st"} <= set(train)
    assert evaluated["test/pq"] == pytest.approx(train["test/pq"], abs=1e-6)
    data = json.loads((out / "panoptic.json").read_text())
    names = [a["file_name"] for a in data["annotations"]]
    sizes = {n: (CS_H, CS_W) for n in names}
    assert len(names) == 3
    assert {a["image_id"] for a in data["annotations"]} == set(CS_SPLITS["val"])  # string ids, as the GT JSON
    # category ids are Cityscapes labelIds (createPanopticImgs' convention)
    _check_panoptic_export(out, names, sizes, {c["id"] for c in data["categories"]})
    assert {c["id"] for c in data["categories"]} == CS_LABEL_IDS


def test_cityscapes_instance_trains_and_evaluates(tmp_path: Path) -> None:
    """No K-Net setting for Cityscapes instance: the instance model on the data config."""
    write_cityscapes(tmp_path / "cityscapes")
    overrides = [
        "~experiment", "model=knet_instance", "data=cityscapes_instance", f"data.root={tmp_path / 'cityscapes'}",
        *LOADER, "data.train_short_edge=[16,24]", "data.train_max_size=64", "data.eval_short_edge=16",
        "data.eval_max_size=64", "data.val_batch_size=3", "optimized_metric=val/map", *TINY_MODEL,
    ]  # fmt: skip
    train, evaluated, out = _run_train_then_eval(tmp_path, overrides)
    assert {"val/map", "test/map", "test/map_50"} <= set(train)
    assert evaluated["test/map"] == pytest.approx(train["test/map"], abs=1e-6)
    results = json.loads((out / "instances.json").read_text())
    assert results and all(r["segmentation"]["size"] == [CS_H, CS_W] for r in results)
    assert {r["image_id"] for r in results} == set(CS_SPLITS["val"])  # the readers' ids: file stems
    # category ids are Cityscapes labelIds of the 8 instance classes
    assert {r["category_id"] for r in results} <= {24, 25, 26, 27, 28, 31, 32, 33}


def test_instance_mode_on_synthetic_data_reports_mask_ap(tmp_path: Path) -> None:
    """``model=knet_instance data=synthetic``: stuff segments are not instances; val/map is logged."""
    cfg = compose_cfg(tmp_path, ["model=knet_instance", "data=synthetic", "optimized_metric=val/map", "debug=limit",
                                 "trainer.check_val_every_n_epoch=1",
                                 *TINY_MODEL, *TINY_DATA])  # fmt: skip
    value = run_cfg(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large"):
        assert f"val/{key}" in metrics and f"test/{key}" in metrics
    assert value == pytest.approx(metrics["val/map"])
    assert -1.0 <= metrics["val/map"] <= 1.0
    assert "val/pq" not in metrics  # instance mode evaluates mask AP only
    # the best checkpoint is chosen by val/map (the monitor found its metric)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt")] == ["epoch_000.ckpt"]
