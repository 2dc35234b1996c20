"""The Python inference API: ``Segmenter.from_checkpoint(path)(images)``.

One tiny panoptic model is trained for 12 steps on the synthetic data set through the CLI;
its checkpoint alone (no config) must give the predictions ``mode=eval export_predictions=true``
writes, on every kind of input, at the input's original size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_utils import compose_cfg, run_cfg, tiny_overrides
from docs_blocks import blocks, commands, section
from PIL import Image

from knet_lightning import SegmentationResult, Segmenter, SkippedInput
from knet_lightning.checkpoint.io import load_checkpoint_file
from knet_lightning.checkpoint.keys import INFERENCE_KEY
from knet_lightning.data.io import rgb2id

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# low thresholds, stored in the checkpoint, so that a model of a few steps predicts segments to compare
# the page of the Python example, mode=predict and the ONNX export (tests/test_wheel.py runs the
# example from the installed wheel too)
USE_A_TRAINED_MODEL = "docs/guides/use-a-trained-model.md"


def python_example() -> str:
    """The page's first Python block: the ``Segmenter`` example."""
    return blocks(section(USE_A_TRAINED_MODEL, "# Use a trained model"), "python")[0]


def use_a_trained_model_commands() -> list[str]:
    """Every ``python -m knet_lightning`` command of the page's bash blocks."""
    from test_readme import COMMAND

    page = section(USE_A_TRAINED_MODEL, "# Use a trained model")
    return [command for block in blocks(page) for command in commands(block, COMMAND)]


TRAIN = tiny_overrides(
    "model.num_vis_images=0",
    "test_after_fit=false",
    "trainer.max_epochs=6",
    "model.postprocess.object_mask_thr=0.05",
    "model.postprocess.mask_thr=0.3",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, the synthetic data set's folder) of a 6-epoch (12-step) tiny panoptic run."""
    tmp = tmp_path_factory.mktemp("segmenter")
    cfg = compose_cfg(tmp, TRAIN)
    run_cfg(cfg)
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt, Path(cfg.data.root)


def test_checkpoint_carries_the_inference_settings(trained: tuple[Path, Path]) -> None:
    ckpt, _ = trained
    settings = load_checkpoint_file(ckpt)[INFERENCE_KEY]
    # the synthetic data set: no resize (the references' arithmetic where there is one), ImageNet
    # normalisation, padding to 32, its category ids
    assert settings == {
        "short_edge": None, "max_size": None, "resize_backend": "cv2", "mean": pytest.approx([0.485, 0.456, 0.406]),
        "std": pytest.approx([0.229, 0.224, 0.225]), "size_divisor": 32, "dataset_ids": [1, 2, 3, 4, 101, 102, 103],
    }  # fmt: skip


def test_results_equal_the_mode_eval_exported_predictions(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, root = trained
    cfg = compose_cfg(tmp_path, [*TRAIN, "mode=eval", f"ckpt_path={ckpt}", "export_predictions=true",
                                 f"data.root={root}"])  # fmt: skip
    run_cfg(cfg)
    exported = json.loads((tmp_path / "run" / "predictions" / "panoptic.json").read_text())
    images = sorted((root / "val2017").glob("*.jpg"))
    assert len(images) == len(exported["annotations"]) == 4

    seg = Segmenter.from_checkpoint(ckpt, precision="fp32")  # as mode=eval runs on the CPU
    results = seg(images, batch_size=3)
    assert all(isinstance(r, SegmentationResult) for r in results)
    assert sum(len(a["segments_info"]) for a in exported["annotations"]) > 0  # something to compare
    for path, result in zip(images, results):
        (ann,) = [a for a in exported["annotations"] if Path(a["file_name"]).stem == path.stem]
        png = np.asarray(Image.open(tmp_path / "run" / "predictions" / "panoptic" / ann["file_name"]))
        coco = result.to_coco(file_name=path.name)
        assert coco["file_name"] == ann["file_name"]
        assert np.array_equal(rgb2id(np.asarray(coco["png"]).astype(np.int64)), rgb2id(png.astype(np.int64)))
        ours = [(s["id"], s["category_id"], s["area"]) for s in coco["segments_info"]]
        theirs = [(s["id"], s["category_id"], s["area"]) for s in ann["segments_info"]]
        assert ours == theirs
        assert result.panoptic.shape == result.size == png.shape[:2]
        # typed segments agree with the map
        for s in result.segments:
            assert s.area == int((result.panoptic == s.id).sum())
            assert s.class_name == seg.class_names[s.label] and s.is_thing == seg.isthing[s.label]


def _photo(root: Path) -> np.ndarray:
    return np.asarray(Image.open(sorted((root / "val2017").glob("*.jpg"))[0]).convert("RGB"))


def test_every_input_kind_gives_a_result_of_the_original_size(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, root = trained
    seg = Segmenter.from_checkpoint(ckpt)
    rgb = _photo(root)[:, :50]  # 64 x 50: not a multiple of the stride
    h, w = rgb.shape[:2]
    gray = rgb.mean(axis=2).astype(np.uint8)
    sixteen = tmp_path / "gray16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    inputs = {
        "path": tmp_path / "rgb.png",
        "PIL RGB": Image.fromarray(rgb),
        "PIL RGBA": Image.fromarray(np.dstack([rgb, np.full((h, w), 128, np.uint8)])),
        "PIL palette": Image.fromarray(rgb).convert("P"),
        "PIL gray": Image.fromarray(gray),
        "16-bit PNG": sixteen,
        "numpy HWC uint8": rgb,
        "numpy HW": gray,
        "numpy uint16": rgb.astype(np.uint16) * 257,
        "numpy float": rgb.astype(np.float32) / 255,
        "tensor CHW uint8": torch.from_numpy(rgb).permute(2, 0, 1),
        "tensor CHW float": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
    }
    Image.fromarray(rgb).save(inputs["path"])
    results = seg(list(inputs.values()))
    for kind, result in zip(inputs, results):
        assert isinstance(result, SegmentationResult), kind
        assert result.size == (h, w) and tuple(result.panoptic.shape) == (h, w), kind
    # the same pixels give the same segments whatever the container
    same = [results[i] for i, k in enumerate(inputs) if k in ("path", "PIL RGB", "PIL RGBA", "numpy HWC uint8",
                                                                "numpy uint16", "numpy float", "tensor CHW uint8",
                                                                "tensor CHW float")]  # fmt: skip
    for r in same[1:]:
        assert torch.equal(r.panoptic, same[0].panoptic)
    # smaller than the network's stride: padded in, cropped out
    tiny = seg(rgb[:7, :9])
    assert tiny.size == (7, 9) and tuple(tiny.panoptic.shape) == (7, 9)


def test_rotated_exif_photo_gives_the_segments_of_the_upright_photo(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, root = trained
    seg = Segmenter.from_checkpoint(ckpt)
    upright = Image.fromarray(_photo(root)[:, :50])
    # stored rotated, with EXIF orientation 6 ("rotate 90 clockwise to display"): a viewer shows it upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    assert Image.open(path).size == (upright.height, upright.width)
    a, b = seg(upright), seg(path)
    assert a.size == b.size == (upright.height, upright.width)
    assert torch.equal(a.panoptic, b.panoptic) and a.segments == b.segments


def test_an_unreadable_file_is_reported_by_name_and_the_batch_completes(
    trained: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt, root = trained
    seg = Segmenter.from_checkpoint(ckpt)
    good = sorted((root / "val2017").glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        results = seg([good[0], bad, tmp_path / "missing.png", good[1]], batch_size=4)
    assert isinstance(results[0], SegmentationResult) and isinstance(results[3], SegmentationResult)
    assert isinstance(results[1], SkippedInput) and results[1].source == str(bad)
    assert isinstance(results[2], SkippedInput) and "missing.png" in results[2].source
    assert "broken.jpg" in caplog.text and "missing.png" in caplog.text


def test_empty_non_finite_and_malformed_arrays_are_skipped_by_name_and_the_batch_completes(
    trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 27: a 0x5x3 array took its whole list down inside the network, and a NaN float image
    was segmented with only a numpy warning. Each bad array or tensor is a ``SkippedInput`` naming
    the input and the reason, as for an unreadable file, alone or in a list; the good ones run."""
    import warnings

    ckpt, root = trained
    seg = Segmenter.from_checkpoint(ckpt, precision="fp32")
    good = _photo(root)[:, :50]
    nan = good.astype(np.float32) / 255
    nan[3, 4, 1] = np.nan
    bad = {
        "an empty image (0x5 HxW); expected at least 1x1": np.zeros((0, 5, 3), np.uint8),
        "an empty image (4x0 HxW)": torch.zeros(3, 4, 0),
        "finite values in [0, 1], got 1 NaN value(s)": nan,
        "finite values in [0, 1], got 64 Inf value(s)": torch.full((1, 8, 8), float("inf")),
        "image with C in 1..4, got shape (8, 8, 5)": np.zeros((8, 8, 5), np.uint8),
        "image with C in 1..4, got shape (5, 8, 8)": torch.zeros(5, 8, 8),
        "expected uint8, uint16 or float pixels, got int64": np.zeros((8, 8, 3), np.int64),
        "expected uint8, uint16 or float pixels, got bool": torch.zeros(3, 8, 8, dtype=torch.bool),
    }
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "All-NaN slice" warning is no answer
        results = seg([good, *bad.values(), good], batch_size=4)
    assert isinstance(results[0], SegmentationResult) and isinstance(results[-1], SegmentationResult)
    assert torch.equal(results[0].panoptic, results[-1].panoptic)
    for k, (reason, result) in enumerate(zip(bad, results[1:-1]), start=1):
        kind = "tensor" if isinstance(bad[reason], torch.Tensor) else "numpy array"
        assert isinstance(result, SkippedInput) and result.source == f"input {k}", reason
        assert result.reason.startswith(f"input {k} ({kind}): ") and reason in result.reason, result.reason
        assert f"skipped input {k}: input {k} ({kind})" in caplog.text
    # alone: the same SkippedInput (as for an unreadable file), not an exception from the network
    alone = seg(np.zeros((0, 5, 3), np.uint8))
    assert isinstance(alone, SkippedInput) and "input 0 (numpy array): an empty image (0x5 HxW)" in alone.reason
    # a bfloat16 tensor in [0, 1] (no numpy dtype) reads as its float32 values
    as_bf16 = seg(torch.from_numpy(good).permute(2, 0, 1).to(torch.bfloat16) / 255)
    assert isinstance(as_bf16, SegmentationResult) and as_bf16.size == good.shape[:2]


def test_overlay_has_a_legend_and_the_image_size(trained: tuple[Path, Path]) -> None:
    ckpt, root = trained
    result = Segmenter.from_checkpoint(ckpt)(sorted((root / "val2017").glob("*.jpg"))[0])
    plain = result.overlay(legend=False)
    assert plain.size == (result.size[1], result.size[0]) and plain.mode == "RGB"
    if result.segments:
        with_legend = result.overlay()
        assert with_legend.width > plain.width and with_legend.height >= plain.height


def test_an_earlier_stage_and_bad_arguments(trained: tuple[Path, Path]) -> None:
    ckpt, root = trained
    first = Segmenter.from_checkpoint(ckpt, stage=1)
    assert first.stage == 1
    with pytest.raises(ValueError, match=r"stage=5 is outside the model's 2 outputs"):
        Segmenter.from_checkpoint(ckpt, stage=5)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        first(sorted((root / "val2017").glob("*.jpg"))[0], batch_size=0)


def test_documented_python_example_runs_as_written(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """The "Use a trained model" Python example, in a fresh process, where its files exist."""
    import shutil
    import subprocess
    import sys

    ckpt, root = trained
    code = python_example()
    cwd = tmp_path / "notebook"
    cwd.mkdir()
    shutil.copy(ckpt, cwd / "last.ckpt")
    photo = Image.open(sorted((root / "val2017").glob("*.jpg"))[0]).convert("RGB")
    photo.save(cwd / "photo.jpg", quality=95)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"torch.Size([{photo.height}, {photo.width}])" in proc.stdout
    assert Image.open(cwd / "overlay.png").height >= photo.height
    assert Image.open(cwd / "photo.png").mode == "RGB"  # the COCO panoptic PNG


def test_instance_and_semantic_results_describe_and_export() -> None:
    """The instance and semantic task objects' typed view and official formats, by hand."""
    from knet_lightning import Segment
    from knet_lightning.tasks import build_task

    names, ids, colors = ["a", "b", "c"], [10, 20, 30], [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    image = np.zeros((6, 8, 3), np.uint8)
    task = build_task("instance", num_classes=3, num_things=3, num_proposals=4, num_stages=1)
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, :3] = True
    masks[1, 3:, :4] = True
    pred = {"masks": masks, "scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([2, 0])}
    fields = task.describe(pred, names, [True] * 3)
    assert fields["segments"] == [Segment(1, 2, "c", pytest.approx(0.9), 24, True),
                                  Segment(2, 0, "a", pytest.approx(0.4), 12, True)]  # fmt: skip
    result = SegmentationResult(task="instance", image=image, class_names=names, isthing=[True] * 3, colors=colors,
                                dataset_ids=ids, prediction=pred, task_object=task, **fields)  # fmt: skip
    entries = result.to_coco(image_id=7)
    assert [(e["image_id"], e["category_id"], e["bbox"]) for e in entries] == [
        (7, 30, [0, 0, 8, 3]),
        (7, 10, [0, 3, 4, 3]),
    ]
    assert result.overlay().width > 8  # the legend column

    task = build_task("semantic", num_classes=3, num_things=0, num_proposals=3, num_stages=1)
    sem = torch.full((6, 8), 255, dtype=torch.int64)
    sem[:2] = 0
    sem[4:] = 2
    fields = task.describe(sem, names, [False] * 3)
    assert fields["segments"] == [Segment(1, 0, "a", None, 16, False), Segment(3, 2, "c", None, 16, False)]
    result = SegmentationResult(task="semantic", image=image, class_names=names, isthing=[False] * 3, colors=colors,
                                dataset_ids=[1, 2, 3], prediction=sem, task_object=task, **fields)  # fmt: skip
    out = result.to_coco(file_name="x.jpg")
    png = np.asarray(out["png"])
    assert out["file_name"] == "x.png" and png.dtype == np.uint8
    assert (png[:2] == 1).all() and (png[2:4] == 0).all() and (png[4:] == 3).all()  # void is 0
    assert result.overlay(legend=False).size == (8, 6)


def test_bf16_precision_runs_and_auto_follows_the_cpu(trained: tuple[Path, Path]) -> None:
    from knet_lightning.inference.segmenter import bf16_supported

    ckpt, root = trained
    images = sorted((root / "val2017").glob("*.jpg"))
    fp32 = Segmenter.from_checkpoint(ckpt, precision="fp32")(images)
    low = Segmenter.from_checkpoint(ckpt, precision="bf16")
    assert low.precision == "bf16"
    for a, b in zip(fp32, low(images)):
        assert b.panoptic.dtype == a.panoptic.dtype and b.size == a.size
    # the network's logits under bf16 autocast stay close to fp32's (the segments of this barely
    # trained model sit at its thresholds, so they are not compared)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = low.module(x)[-1].mask_logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = low.module(x)[-1].mask_logits
    assert half.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(half.float().flatten(), ref.flatten(), dim=0) > 0.99
    auto = Segmenter.from_checkpoint(ckpt)  # the default
    assert auto.precision == ("bf16" if bf16_supported(torch.device("cpu")) else "fp32")
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'auto'\), got 'fp16'"):
        Segmenter.from_checkpoint(ckpt, precision="fp16")


def test_predict_cli_writes_official_outputs_and_overlays_for_a_folder_tree(
    trained: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``mode=predict`` is the Segmenter over ``inputs``: the same segments, one output per image
    mirroring the folders, an overlay each, and a summary naming the skipped file."""
    ckpt, root = trained
    images = sorted((root / "val2017").glob("*.jpg"))
    tree = tmp_path / "photos"
    (tree / "sub" / "deeper").mkdir(parents=True)
    Image.open(images[0]).save(tree / "first.jpg")
    Image.open(images[1]).save(tree / "sub" / "second.png")
    Image.open(images[2]).save(tree / "sub" / "deeper" / "third.jpg")
    (tree / "sub" / "broken.jpg").write_bytes(b"not an image")
    (tree / "notes.md").write_text("not an image suffix: not an input")
    cfg = compose_cfg(tmp_path / "p", [*TRAIN, f"ckpt_path={ckpt}", f"inputs={tree}", "predict.batch_size=2",
                                       "predict.precision=fp32"], config_name="predict")  # fmt: skip
    with caplog.at_level(logging.INFO):
        run_cfg(cfg)
    out = tmp_path / "p" / "run" / "predictions"
    names = ["first.jpg", "sub/deeper/third.jpg", "sub/second.png"]  # sorted by path; broken is skipped
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 3 and [i["file_name"] for i in summary["images"]] == names
    assert summary["skipped"] == [["sub/broken.jpg", pytest.approx(summary["skipped"][0][1])]]
    assert "cannot decode" in summary["skipped"][0][1] and summary["seconds_per_image"] > 0
    assert "predicted 3 image(s) in" in caplog.text and "skipped sub/broken.jpg: " in caplog.text
    exported = json.loads((out / "panoptic.json").read_text())
    assert [a["file_name"] for a in exported["annotations"]] == ["first.png", "sub/deeper/third.png", "sub/second.png"]
    seg = Segmenter.from_checkpoint(ckpt, precision="fp32")
    results = seg([tree / n for n in names])
    assert sum(len(r.segments) for r in results) > 0  # something to compare
    for name, ann, result in zip(names, exported["annotations"], results):
        png = np.asarray(Image.open(out / "panoptic" / ann["file_name"])).astype(np.int64)
        assert np.array_equal(rgb2id(png), result.panoptic.numpy())
        coco = result.to_coco()
        assert [(s["id"], s["category_id"]) for s in ann["segments_info"]] == [
            (s["id"], s["category_id"]) for s in coco["segments_info"]]  # fmt: skip
        overlay = Image.open(out / "overlays" / Path(name).with_suffix(".png"))
        assert np.array_equal(np.asarray(overlay), np.asarray(result.overlay()))
        assert overlay.width > result.size[1] or not result.segments  # the legend column


def test_predict_cli_reads_globs_and_lists_and_takes_postprocess_overrides(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from knet_lightning.inference.predict import collect_inputs

    ckpt, root = trained
    images = sorted((root / "val2017").glob("*.jpg"))
    # a glob: relative to the matches' common folder
    assert [i.name for i in collect_inputs(root / "val*" / "*.jpg")] == [p.name for p in images]
    # a list: relative paths from the list's folder, absolute ones as they are, comments skipped
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# two photos and a missing one\n{images[1]}\n\n../{tmp_path.name}/missing.jpg\n")
    items = collect_inputs(listing)
    assert [i.path.name for i in items] == [images[1].name, "missing.jpg"]
    cfg = compose_cfg(tmp_path / "p", [*TRAIN, f"ckpt_path={ckpt}", f"inputs={listing}", "predict.overlays=false",
                                       "model.postprocess.object_mask_thr=1.0"], config_name="predict")  # fmt: skip
    run_cfg(cfg)
    out = tmp_path / "p" / "run" / "predictions"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 1 and [s[0] for s in summary["skipped"]] == [items[1].name]
    assert not (out / "overlays").exists()
    # no class score exceeds 1: the command line's threshold replaced the checkpoint's 0.05
    (ann,) = json.loads((out / "panoptic.json").read_text())["annotations"]
    assert [s for s in ann["segments_info"] if s["isthing"]] == []


def test_predict_skips_odd_names_folders_and_empty_files_and_predicts_the_rest(
    trained: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 27: a file named ``..jpg`` stopped the whole batch with ``ValueError: unknown file
    extension:`` (its outputs would be ``..png``), naming no file. Such names, a file named only a
    suffix, an empty file and a folder named like an image are skipped with a warning naming them
    and the reason; the rest is predicted and the summary counts the skips."""
    import shutil

    from knet_lightning.inference.predict import collect_inputs, predict_to_folder

    ckpt, root = trained
    good = sorted((root / "val2017").glob("*.jpg"))[0]
    folder = tmp_path / "odd"
    (folder / "x.png").mkdir(parents=True)  # a folder named like an image: searched, not read
    for name in ("..jpg", ".jpg", "a.JPG", "good.jpg"):
        shutil.copy(good, folder / name)
    (folder / "empty.png").write_bytes(b"")
    cfg = compose_cfg(tmp_path / "p", [*TRAIN, f"ckpt_path={ckpt}", f"inputs={folder}", "predict.batch_size=2"],
                      config_name="predict")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        run_cfg(cfg)
    out = tmp_path / "p" / "run" / "predictions"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 2 and [i["file_name"] for i in summary["images"]] == ["a.JPG", "good.jpg"]
    reasons = dict(summary["skipped"])
    assert sorted(reasons) == ["..jpg", ".jpg", "empty.png"]
    assert "its name without its suffix is only dots ('.'): no output file can be named" in reasons["..jpg"]
    assert "its name is only a suffix" in reasons[".jpg"] and "cannot decode" in reasons["empty.png"]
    assert "skipped 3" in caplog.text and f"skipped {folder / '..jpg'}: its name" in caplog.text
    assert sorted(p.name for p in (out / "panoptic").glob("*")) == ["a.png", "good.png"]
    assert sorted(p.name for p in (out / "overlays").glob("*")) == ["a.png", "good.png"]
    # a list that names the folder x.png and a glob that matches it: the folder is skipped, or not an input
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'x.png'}\n{folder / 'good.jpg'}\n")
    seg = Segmenter.from_checkpoint(ckpt, precision="fp32")
    listed = predict_to_folder(seg, collect_inputs(listing), tmp_path / "listed")
    assert listed.done == 1 and listed.skipped == [
        ("x.png", f"{folder / 'x.png'}: expected image file, found a folder")
    ]
    assert [i.name for i in collect_inputs(folder / "*.png")] == ["empty.png"]


def test_predict_refuses_model_overrides_that_contradict_the_checkpoint_as_eval_does(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """Issue 27: ``mode=predict`` dropped ``model.num_stages=3 model.num_proposals=50`` silently where
    ``mode=eval`` refused them; both refuse now, with the same message, before any image is written."""
    ckpt, root = trained
    for mode in ("eval", "predict"):
        cfg = compose_cfg(tmp_path / mode, [f"ckpt_path={ckpt}", f"inputs={root / 'val2017'}", "model.num_stages=3",
                                            "model.num_proposals=50"], config_name=mode)  # fmt: skip
        with pytest.raises(
            ValueError,
            match=rf"mode={mode} ckpt_path={ckpt}: the checkpoint's network differs in model.num_proposals "
            r"\(checkpoint 6, here 50\), model.num_stages \(checkpoint 1, here 3\).*drop the overrides "
            r"model.num_proposals, model.num_stages",
        ):
            run_cfg(cfg)
    assert not (tmp_path / "predict" / "run" / "predictions").exists()


def test_documented_use_a_trained_model_commands_run_as_written(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Every ``python -m knet_lightning`` command of the "Use a trained model" page, in a fresh
    process, in a folder holding the run and the photos it names."""
    import shlex
    import shutil

    from test_readme import COMMAND, _run, unexpected_output

    ckpt, root = trained
    commands = use_a_trained_model_commands()
    assert commands, "the page shows no command"
    cwd = tmp_path / "project"
    (cwd / "logs" / "train" / "runs" / "r1" / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, cwd / "logs" / "train" / "runs" / "r1" / "checkpoints" / "last.ckpt")
    (cwd / "photos" / "trip").mkdir(parents=True)
    for k, path in enumerate(sorted((root / "val2017").glob("*.jpg"))[:2]):
        shutil.copy(path, cwd / "photos" / ("trip" if k else "") / path.name)
    outputs = []
    for command in commands:
        args = shlex.split(command.replace("<run>", "r1"))[len(COMMAND.split()) :]
        proc = _run(args, cwd)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        if "mode=predict" in args:
            out = max(cwd.glob("logs/predict/runs/*/predictions"), key=lambda p: p.stat().st_mtime)
            assert json.loads((out / "summary.json").read_text())["done"] == 2
            assert len(list((out / "panoptic").rglob("*.png"))) == len(list((out / "overlays").rglob("*.png"))) == 2
            outputs.append(json.loads((out / "panoptic.json").read_text())["annotations"])
        if "mode=export" in args:
            assert (cwd / "model.onnx").is_file()
            # the run folder, the check and the file: not the ~100 INFO lines of the exporter's passes
            out = proc.stdout + proc.stderr
            assert not unexpected_output(out) and "onnxscript" not in out and "onnx_ir" not in out, out[-3000:]
    assert len(outputs) == 2, commands  # a PyTorch predict and an ONNX Runtime one
    # the same segments from the checkpoint and from its ONNX file
    assert [[s["category_id"] for s in a["segments_info"]] for a in outputs[0]] == [
        [s["category_id"] for s in a["segments_info"]] for a in outputs[1]]  # fmt: skip
