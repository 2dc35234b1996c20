"""Your own data set, for the three tasks: the "Train on your own data" commands
(docs/guides/own-data.md) run as
written (train, evaluate, predict) on tiny data sets in each layout, with the classes taken from
the files: a COCO panoptic set with non-contiguous category ids, a semantic folder of 3 classes
(``reduce_zero_label`` both ways) and a COCO instance set of 2 classes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from docs_blocks import blocks, commands, section
from PIL import Image
from pycocotools import mask as mask_utils
from test_readme import COMMAND, ONE_EPOCH, TINY_KERNELS, TINY_NET, _run

from knet_lightning.data.io import id2rgb

PAGE = "docs/guides/own-data.md"
SECTION = "# Train on your own data"
SIZE = 64
# COCO-format sets: their images at their own size (64 px), not enlarged to the recipe's 800
KEEP_SIZE = ["data.train_short_edge=64", "data.train_max_size=96", "data.eval_short_edge=64", "data.eval_max_size=96"]
# the semantic recipe (UPerNet, 80k iterations at 512x512) at toy size: a few steps on 64 px crops
TINY_SEMANTIC = ["model.net.backbone_depth=18", "model.net.channels=32", "model.net.updator_channels=32",
                 "model.net.aux_channels=16", "model.net.feedforward_channels=64", "model.net.num_heads=2",
                 "model.num_stages=1", "data.img_scale=[128,64]", "data.crop_size=64", "trainer.max_steps=4",
                 "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]  # fmt: skip
LOADER = ["data.num_workers=0", "data.persistent_workers=false", "data.batch_size=2", "model.net.pretrained=false"]
# the own panoptic set's categories: ids as a user's annotation tool numbered them
PANOPTIC_CATEGORIES = [
    {"id": 7, "name": "cat", "isthing": 1, "color": [220, 20, 60], "supercategory": "animal"},
    {"id": 9, "name": "dog", "isthing": 1, "color": [0, 0, 142], "supercategory": "animal"},
    {"id": 50, "name": "sky", "isthing": 0, "color": [70, 130, 180], "supercategory": "background"},
    {"id": 60, "name": "lawn", "isthing": 0, "color": [107, 142, 35], "supercategory": "background"},
]
INSTANCE_CATEGORIES = [
    {"id": 3, "name": "bolt", "supercategory": "part"},
    {"id": 8, "name": "nut", "supercategory": "part"},
]
SEMANTIC_CLASSES = ["sky", "road", "car"]


def own_data_commands() -> dict[str, list[str]]:
    """The page's ``python -m knet_lightning`` commands, by experiment."""
    by_experiment: dict[str, list[str]] = {}
    for block in blocks(section(PAGE, SECTION)):
        for line in commands(block, COMMAND):
            experiment = re.search(r"experiment=(\S+)", line).group(1)
            by_experiment.setdefault(experiment, []).append(line)
    return by_experiment


def _blobs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image and a map of regions: 0 top (sky), 1 bottom (ground), 2 and 3 two squares."""
    regions = np.zeros((SIZE, SIZE), np.uint8)
    regions[SIZE // 2 :] = 1
    y, x = rng.integers(4, 20, 2)
    regions[y : y + 14, x : x + 14] = 2
    y, x = rng.integers(36, 48, 2)
    regions[y : y + 12, x : x + 12] = 3
    colours = np.array([[90, 140, 220], [60, 160, 60], [220, 40, 40], [30, 30, 200]], np.uint8)
    image = (colours[regions] + rng.integers(0, 30, (SIZE, SIZE, 3))).clip(0, 255).astype(np.uint8)
    return image, regions


def write_own_panoptic(root: Path) -> None:
    """COCO panoptic layout, 4 train + 2 val images: cat and dog squares on sky and lawn."""
    rng = np.random.default_rng(0)
    for split, count in (("train2017", 4), ("val2017", 2)):
        (root / split).mkdir(parents=True)
        (root / "annotations" / f"panoptic_{split}").mkdir(parents=True)
        images, annotations = [], []
        for i in range(count):
            image, regions = _blobs(rng)
            ids = np.array([1, 2, 3, 4], np.uint32)[regions]
            name = f"{split}_{i}"
            Image.fromarray(image).save(root / split / f"{name}.jpg")
            Image.fromarray(id2rgb(ids)).save(root / "annotations" / f"panoptic_{split}" / f"{name}.png")
            images.append({"id": i + 1, "file_name": f"{name}.jpg", "height": SIZE, "width": SIZE})
            segments = [{"id": sid, "category_id": cat, "iscrowd": 0, "area": int((ids == sid).sum()), "bbox": [0, 0, 1, 1]}
                        for sid, cat in ((1, 50), (2, 60), (3, 7), (4, 9))]  # fmt: skip
            annotations.append({"image_id": i + 1, "file_name": f"{name}.png", "segments_info": segments})
        payload = {"images": images, "annotations": annotations, "categories": PANOPTIC_CATEGORIES}
        (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(payload))


def write_own_semantic(root: Path, reduce_zero_label: bool) -> None:
    """img_dir / ann_dir with train (4) and val (2), 3 classes; labels 0..2 (255 ignored) or, with
    ``reduce_zero_label``, 1..3 with 0 unlabelled."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 4), ("val", 2)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(count):
            image, regions = _blobs(rng)
            labels = np.array([0, 1, 2, 2], np.uint8)[regions]
            labels[:2] = 255  # a strip nobody labelled
            if reduce_zero_label:
                labels = np.where(labels == 255, 0, labels + 1).astype(np.uint8)
            Image.fromarray(image).save(root / "img_dir" / split / f"{i:04d}.jpg")
            Image.fromarray(labels, mode="L").save(root / "ann_dir" / split / f"{i:04d}.png")
    (root / "classes.txt").write_text("\n".join(SEMANTIC_CLASSES) + "\n")


def write_own_instance(root: Path) -> None:
    """COCO instance layout, 4 train + 2 val images: one bolt and one nut each (RLE masks)."""
    rng = np.random.default_rng(2)
    ann_id = 1
    for split, count in (("train2017", 4), ("val2017", 2)):
        (root / split).mkdir(parents=True)
        (root / "annotations").mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, regions = _blobs(rng)
            name = f"{split}_{i}.jpg"
            Image.fromarray(image).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "height": SIZE, "width": SIZE})
            for region, category in ((2, 3), (3, 8)):
                rle = mask_utils.encode(np.asfortranarray((regions == region).astype(np.uint8)))
                box = [float(v) for v in mask_utils.toBbox(rle)]
                annotations.append({"id": ann_id, "image_id": i + 1, "category_id": category, "iscrowd": 0,
                                    "area": float(mask_utils.area(rle)), "bbox": box,
                                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})  # fmt: skip
                ann_id += 1
        payload = {"images": images, "annotations": annotations, "categories": INSTANCE_CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))


def _reductions(experiment: str) -> list[str]:
    if experiment == "own_semantic":
        return TINY_SEMANTIC + LOADER
    epochs = [o for o in ONE_EPOCH if not o.startswith("trainer.max_epochs=")] + ["trainer.max_epochs=2"]
    return TINY_NET + TINY_KERNELS + epochs + KEEP_SIZE + LOADER + ["data.val_batch_size=2"]


@pytest.mark.parametrize(("experiment", "reduce_zero_label"),
                         [("own_panoptic", None), ("own_semantic", False), ("own_semantic", True),
                          ("own_instance", None)])  # fmt: skip
def test_documented_own_data_commands_train_evaluate_and_predict(tmp_path: Path, experiment: str,
                                                                 reduce_zero_label: bool | None) -> None:  # fmt: skip
    commands = own_data_commands()[experiment]
    assert [c.split("mode=")[1].split()[0] if "mode=" in c else "train" for c in commands] == [
        "train",
        "eval",
        "predict",
    ]
    root = tmp_path / "mine"
    if experiment == "own_panoptic":
        write_own_panoptic(root)
    elif experiment == "own_instance":
        write_own_instance(root)
    else:
        write_own_semantic(root, bool(reduce_zero_label))
    cwd = tmp_path / "work"
    cwd.mkdir()
    extra = _reductions(experiment) + (["data.reduce_zero_label=true"] if reduce_zero_label else [])
    for command in commands:
        args = shlex.split(command.replace("/data/mine", str(root)))[len(COMMAND.split()) :]
        assert not any(a.startswith(("data.num_", "+data.num_")) for a in args)  # no class count is typed
        if "mode=predict" in args:  # the predict command reads the checkpoint, not the data set
            extra = [a for a in extra if not a.startswith(("data.", "model.", "trainer."))]
        proc = _run(args + extra, cwd)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    logs = cwd / "logs"
    (train,) = logs.glob("train/runs/*")
    resolved = (train / "config_resolved.yaml").read_text()
    (evaluated,) = logs.glob("eval/runs/*/metrics.json")
    metrics = json.loads(evaluated.read_text())
    (predicted,) = logs.glob("predict/runs/*/predictions")
    assert sorted(p.name for p in predicted.glob("overlays/*.png")), "no overlay"
    if experiment == "own_panoptic":
        assert "num_classes: 4" in resolved and "num_things: 2" in resolved
        assert {"test/pq", "test/pq_th", "test/pq_st"} <= set(metrics)
        exported = json.loads((predicted / "panoptic.json").read_text())
        assert [(c["id"], c["name"]) for c in exported["categories"]] == [
            (c["id"], c["name"]) for c in PANOPTIC_CATEGORIES
        ]
        assert sorted(p.name for p in predicted.glob("panoptic/*.png")) == ["val2017_0.png", "val2017_1.png"]
    elif experiment == "own_instance":
        assert "num_classes: 2" in resolved
        assert "test/map" in metrics
        results = json.loads((predicted / "instances.json").read_text())
        assert {r["category_id"] for r in results} <= {3, 8}
    else:
        assert "num_classes: 3" in resolved and "num_stuff: 3" in resolved
        assert {"test/miou", "test/acc"} <= set(metrics)
        labels = {v for p in predicted.glob("semantic/*.png") for v in np.unique(np.array(Image.open(p))).tolist()}
        # the data set's own label values: 1..3 with reduce_zero_label, else 0..2
        assert labels and labels <= ({1, 2, 3} if reduce_zero_label else {0, 1, 2})
    summary = json.loads(next(logs.glob("predict/runs/*/predictions/summary.json")).read_text())
    assert summary["done"] == 2
    print(
        f"{experiment} (reduce_zero_label={reduce_zero_label}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items()) if k in ("test/pq", "test/miou", "test/map"))
    )
    # the Python API names the data set's classes (its results, the overlay's legend)
    from knet_lightning import Segmenter

    seg = Segmenter.from_checkpoint(train / "checkpoints" / "last.ckpt", precision="fp32")
    expected = {"own_panoptic": [c["name"] for c in PANOPTIC_CATEGORIES], "own_semantic": SEMANTIC_CLASSES,
                "own_instance": [c["name"] for c in INSTANCE_CATEGORIES]}[experiment]  # fmt: skip
    assert seg.class_names == expected
    image = next(p for p in root.rglob("*.jpg") if "val" in str(p))
    result = seg(image)
    assert {s.class_name for s in result.segments} <= set(expected)
    assert result.overlay().size[0] > SIZE  # the image and its legend of class names
    # the page: the checkpoint alone, with data.root: its stored data config gives reader, classes, pipeline
    command = checkpoint_eval_command()
    checkpoint = train / "checkpoints" / "last.ckpt"
    args = shlex.split(command.replace("<checkpoint>", str(checkpoint)).replace("/data/mine", str(root)))
    proc = _run(args[len(COMMAND.split()) :], cwd)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "the data set the checkpoint was trained on" in proc.stdout + proc.stderr
    again = json.loads(max(logs.glob("eval/runs/*/metrics.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert again == pytest.approx(metrics)


def checkpoint_eval_command() -> str:
    """The page's inline ``mode=eval ckpt_path=<checkpoint> data.root=...`` command."""
    text = section(PAGE, SECTION)
    (command,) = re.findall(r"`(python -m knet_lightning mode=eval ckpt_path=<checkpoint> [^`]*)`", text)
    return command


# ------------------------------------------------------------------ the semantic folder reader
def test_semantic_classes_from_a_text_json_or_yaml_file_or_a_list(tmp_path: Path) -> None:
    from knet_lightning.data.semantic_folder import SemanticFolderDataModule

    write_own_semantic(tmp_path / "a", reduce_zero_label=False)
    dm = SemanticFolderDataModule(tmp_path / "a", num_workers=0)
    info = dm.class_info
    assert info.names == tuple(SEMANTIC_CLASSES) and info.num_stuff == 3 and info.dataset_ids == (0, 1, 2)
    palette = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    (tmp_path / "meta.json").write_text(json.dumps({"classes": SEMANTIC_CLASSES, "palette": palette}))
    (tmp_path / "meta.yaml").write_text("classes: [sky, road, car]\npalette: [[1, 2, 3], [4, 5, 6], [7, 8, 9]]\n")
    for source in (tmp_path / "meta.json", str(tmp_path / "meta.yaml")):
        info = SemanticFolderDataModule(tmp_path / "a", classes=source, reduce_zero_label=True).class_info
        assert info.names == tuple(SEMANTIC_CLASSES) and info.colors == tuple(map(tuple, palette))
        assert info.dataset_ids == (1, 2, 3)  # what the label PNG writer writes back
    assert SemanticFolderDataModule(tmp_path / "a", classes=["x", "y"]).class_info.names == ("x", "y")


def test_semantic_reader_errors_name_the_file_and_what_was_expected(tmp_path: Path) -> None:
    from knet_lightning.data.meta import DatasetError
    from knet_lightning.data.semantic_folder import SemanticFolderDataModule

    root = tmp_path / "a"
    write_own_semantic(root, reduce_zero_label=False)
    with pytest.raises(DatasetError, match=r"no class file.*data.classes=\[sky,road,car\]"):
        SemanticFolderDataModule(root, classes=str(tmp_path / "none.txt")).class_info  # noqa: B018
    with pytest.raises(DatasetError, match=r"class names must be unique, \['sky'\] repeat"):
        SemanticFolderDataModule(root, classes=["sky", "sky"]).class_info  # noqa: B018
    with pytest.raises(DatasetError, match=r"one \[r, g, b\] \(0..255\) per class"):
        SemanticFolderDataModule(root, palette=[[0, 0, 0]]).class_info  # noqa: B018
    # two classes named, labels 0..2 on disk: the value out of range, the file and the rule are named
    dm = SemanticFolderDataModule(root, classes=["sky", "road"], num_workers=0)
    dm.setup("validate")
    with pytest.raises(
        DatasetError,
        match=r"0000.png: label values \[2\] out of range; expected 0..1 or 255 for 2 "
        r"classes \(reduce_zero_label=False\)",
    ):
        dm.datasets["val"][0]
    (root / "ann_dir" / "val" / "0001.png").unlink()
    with pytest.raises(
        DatasetError, match=r"missing label file for 1 image\(s\).*0001.jpg \(expected <image stem>.png\)"
    ):
        SemanticFolderDataModule(root, num_workers=0).setup("validate")


def test_eval_compares_only_the_model_keys_typed_on_its_command_line(tmp_path: Path) -> None:
    """Issue 27: a COCO-format run trained with ``model.net.frozen_stages=-1 model.net.norm_eval=false``
    and size overrides, evaluated with the same size overrides and without those two, was refused
    for them (the option's defaults, 1 and true, counted as typed once ``model=`` was on the command
    line). Keys not typed come from the checkpoint, however the data set is chosen; a typed
    contradicting key is still refused by name."""
    import json

    from cli_utils import compose_cfg, run_cfg

    write_own_panoptic(tmp_path / "mine")
    size = [f"data.root={tmp_path / 'mine'}", *TINY_NET, *TINY_KERNELS, *ONE_EPOCH, *KEEP_SIZE, *LOADER]
    run_cfg(compose_cfg(tmp_path / "train", ["experiment=own_panoptic", *size, "model.net.frozen_stages=-1",
                                             "model.net.norm_eval=false"]))  # fmt: skip
    ckpt = tmp_path / "train" / "run" / "checkpoints" / "last.ckpt"
    chosen = {"experiment": ["experiment=own_panoptic"], "model and data": ["data=coco_panoptic", "model=knet_panoptic"],
              "experiment and model": ["experiment=own_panoptic", "model=knet_panoptic"]}  # fmt: skip
    for name, choice in chosen.items():
        run_cfg(compose_cfg(tmp_path / name, [*choice, *size, f"ckpt_path={ckpt}"], config_name="eval"))
        assert "test/pq" in json.loads((tmp_path / name / "run" / "metrics.json").read_text()), name
    with pytest.raises(ValueError, match=r"differs in model.net.frozen_stages \(checkpoint -1, here 1\);.*drop the "
                                         r"overrides model.net.frozen_stages\. "):  # fmt: skip
        run_cfg(compose_cfg(tmp_path / "typed", [*chosen["model and data"], *size, f"ckpt_path={ckpt}",
                                                 "model.net.frozen_stages=1"], config_name="eval"))  # fmt: skip


def test_a_typed_class_count_is_checked_against_the_class_file(tmp_path: Path) -> None:
    from cli_utils import compose_cfg, run_cfg

    write_own_semantic(tmp_path / "mine", reduce_zero_label=False)
    cfg = compose_cfg(tmp_path, ["experiment=own_semantic", f"data.root={tmp_path / 'mine'}", "data.num_classes=150",
                                 *TINY_SEMANTIC, *LOADER])  # fmt: skip
    with pytest.raises(
        ValueError, match=r"data.num_classes=150 but the data set's categories give 3 \(0 things, 3 stuff\)"
    ):
        run_cfg(cfg)


def test_published_coco_weights_fine_tune_onto_your_own_classes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The own-data page: ``load_from=<converted COCO checkpoint> load_from_strict=false`` on the
    own 4-class panoptic set loads every network tensor but the classifiers (133 classes -> 2 + 2), and says which."""
    import torch
    from cli_utils import compose_cfg, run_cfg
    from test_convert_mmdet import official_keys, random_official
    from test_readme import _write_coco_panoptic

    _write_coco_panoptic(tmp_path / "coco")
    source = tmp_path / "knet_s3_r50_fpn_1x_coco-panoptic.pth"
    meta = {"mmdet_version": "2.17.0", "CLASSES": [f"class{c}" for c in range(133)]}
    torch.save({"meta": meta, "state_dict": random_official(official_keys("panoptic_r50"))}, source)
    converted = tmp_path / "knet_panoptic.ckpt"
    run_cfg(compose_cfg(tmp_path / "convert", ["mode=convert", "experiment=knet_r50_coco_panoptic_1x",
                                               f"data.root={tmp_path / 'coco'}", f"convert_source={source}",
                                               f"convert_output={converted}"]))  # fmt: skip
    write_own_panoptic(tmp_path / "mine")
    one_step = [*LOADER, *KEEP_SIZE, "trainer.max_steps=1", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                "trainer.limit_val_batches=0", "test_after_fit=false"]  # fmt: skip
    with caplog.at_level("INFO", logger="knet_lightning.checkpoint.model"):
        run_cfg(compose_cfg(tmp_path / "own", ["experiment=own_panoptic", f"data.root={tmp_path / 'mine'}", *one_step,
                                               f"load_from={converted}", "load_from_strict=false"]))  # fmt: skip
    (message,) = [r.getMessage() for r in caplog.records if "(not strict)" in r.getMessage()]
    assert (
        "494 of 502 network tensors loaded; optimizer and schedule start afresh; left as initialised: 8 of another "
        "shape: kernel_head.conv_seg.* (2), update_heads.0.* (2), update_heads.1.* (2), update_heads.2.* (2)"
    ) in message
    # those 8 are the classifiers: the initial kernels' classes and each stage's fc_cls
    from knet_lightning.checkpoint.io import load_checkpoint_file

    theirs = load_checkpoint_file(converted)["state_dict"]
    ours = load_checkpoint_file(tmp_path / "own" / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert sorted(k.removeprefix("net.") for k in theirs if theirs[k].shape != ours[k].shape) == [
        "kernel_head.conv_seg.bias", "kernel_head.conv_seg.weight", *(f"update_heads.{s}.fc_cls.{p}" for s in range(3)
                                                                        for p in ("bias", "weight"))]  # fmt: skip


def test_a_resize_that_enlarges_small_images_says_so_with_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cli_utils import compose_cfg

    from knet_lightning.cli import build_datamodule

    write_own_panoptic(tmp_path / "pan")
    write_own_semantic(tmp_path / "sem", reduce_zero_label=False)
    cases = [("own_panoptic", "pan", [], "enlarges this data set's images 12.5x (median 64x64 px -> 800x800): slower, "
              "and no detail is gained; keep them near their size with data.train_short_edge=64 data.eval_short_edge=64"),
             ("own_semantic", "sem", [], "the val resize enlarges this data set's images 8.0x (median 64x64 px -> "
              "512x512)"), ("own_semantic", "sem", [], "data.img_scale=[256,64] data.crop_size=64"),
             ("own_panoptic", "pan", KEEP_SIZE, None)]  # fmt: skip
    for experiment, root, extra, expected in cases:
        caplog.clear()
        cfg = compose_cfg(tmp_path / experiment, [f"experiment={experiment}", f"data.root={tmp_path / root}", *extra])
        with caplog.at_level("WARNING", logger="knet_lightning.data.datamodule"):
            build_datamodule(cfg).setup("fit")
        if expected is None:
            assert "enlarges" not in caplog.text
        else:
            assert expected in caplog.text, caplog.text


def check_data_command() -> str:
    """The page's inline ``mode=check_data`` command."""
    (command,) = re.findall(r"`(python -m knet_lightning mode=check_data [^`]*)`", section(PAGE, SECTION))
    return command


def _check(root: Path, cwd: Path, experiment: str) -> tuple[Any, dict]:
    command = check_data_command().replace("own_panoptic", experiment).replace("/data/mine", str(root))
    cwd.mkdir(parents=True, exist_ok=True)
    proc = _run(shlex.split(command)[len(COMMAND.split()) :], cwd)
    (report,) = cwd.glob("logs/check_data/runs/*/data_check/data_check.json")
    assert report.with_name("class_histogram.png").is_file()
    return proc, json.loads(report.read_text())


def test_data_check_reports_classes_and_counts_and_names_each_defect(tmp_path: Path) -> None:
    from knet_lightning.data.io import id2rgb as to_rgb

    # a clean set: counts per class, exit 0
    write_own_panoptic(tmp_path / "pan")
    proc, report = _check(tmp_path / "pan", tmp_path / "clean", "own_panoptic")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, val = report["splits"]
    assert (train["images"], val["images"], report["problems"]) == (4, 2, 0)
    assert [c["name"] for c in report["classes"]] == ["cat", "dog", "sky", "lawn"]
    assert train["segments"] == [4, 4, 4, 4] and sum(train["pixels"]) == 4 * SIZE * SIZE
    assert "train: 4 images, 16 segments" in proc.stdout

    # planted: an unknown category id (train JSON), a missing PNG and a size mismatch (val)
    root = tmp_path / "bad"
    write_own_panoptic(root)
    train_json = root / "annotations" / "panoptic_train2017.json"
    data = json.loads(train_json.read_text())
    data["annotations"][1]["segments_info"][0]["category_id"] = 99
    train_json.write_text(json.dumps(data))
    (root / "annotations" / "panoptic_val2017" / "val2017_0.png").unlink()
    Image.fromarray(to_rgb(np.ones((SIZE, SIZE + 8), np.uint32))).save(
        root / "annotations" / "panoptic_val2017" / "val2017_1.png"
    )
    proc, report = _check(root, tmp_path / "planted", "own_panoptic")
    assert proc.returncode != 0
    problems = [p for split in report["splits"] for p in split["problems"]]
    assert len(problems) == report["problems"] == 3
    text = "\n".join(f"{name}: {message}" for name, message in problems)
    assert "panoptic_train2017.json: annotations[1]" in text and "unknown category id 99" in text
    assert "val2017_0.png: panoptic PNG not found" in text
    assert "val2017_1.png: PNG size 72x64 (WxH) differs from the image val2017_1.jpg size 64x64" in text
    assert "data check: 3 problem(s)" in proc.stderr

    # a semantic set: an unknown label value and a size mismatch (val), an image without its label (train)
    root = tmp_path / "sem"
    write_own_semantic(root, reduce_zero_label=False)
    Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8), mode="L").save(root / "ann_dir" / "val" / "0000.png")
    Image.fromarray(np.zeros((SIZE // 2, SIZE), np.uint8), mode="L").save(root / "ann_dir" / "val" / "0001.png")
    (root / "ann_dir" / "train" / "0003.png").unlink()
    proc, report = _check(root, tmp_path / "semantic", "own_semantic")
    assert proc.returncode != 0
    text = "\n".join(f"{name}: {message}" for split in report["splits"] for name, message in split["problems"])
    assert "missing label file for 1 image(s)" in text and "0003.jpg" in text
    assert "0000.jpg: " in text and "label values [7] out of range; expected 0..2 or 255 for 3 classes" in text
    assert "0001.jpg: " in text and "label size 64x32 (WxH) differs from the image 0001.jpg size 64x64" in text


@pytest.mark.parametrize("experiment", ["knet_fcn_r50_ade20k_80k", "knet_pspnet_r50_ade20k_80k",
                                        "knet_deeplabv3_r50_ade20k_80k", "knet_upernet_r50_ade20k_80k",
                                        "knet_upernet_swin-t_ade20k_80k"])  # fmt: skip
def test_every_semantic_model_config_reads_a_semantic_folder(tmp_path: Path, experiment: str) -> None:
    """``experiment=<any semantic setting> data=semantic_folder``: the network gets the folder's 3 classes."""
    import torch
    from cli_utils import compose_cfg

    from knet_lightning.cli import build_datamodule, build_model

    write_own_semantic(tmp_path / "mine", reduce_zero_label=False)
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", "data=semantic_folder", f"data.root={tmp_path / 'mine'}",
                                 "model.net.pretrained=false", "data.num_workers=0", "data.persistent_workers=false"])  # fmt: skip
    datamodule = build_datamodule(cfg)
    module = build_model(cfg, datamodule.class_info).eval()
    assert module.class_names == SEMANTIC_CLASSES and cfg.data.num_classes == 3
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        outputs = module(batch["images"])
    assert outputs[-1].mask_logits.shape[:2] == (1, 3)
