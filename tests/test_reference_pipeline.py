"""The whole test path equals the references': image resize, normalisation, padding, network,
logits resized back to the image.

- Semantic: MMSegmentation 1.2.2's own ``init_model`` + ``inference_model`` (its config's test
  pipeline: read, ``Resize`` keep-ratio with mmcv, normalise, whole-image inference, logits
  resized to the image) against ``Segmenter(precision="fp32")`` on the converted checkpoint, for
  the four R50 K-Net configs and Swin-T, random weights, on images that the test resize enlarges
  and shrinks.
- Detection (mmdet 2.x's K-Net resizes with the same mmcv functions): the network input of the
  COCO experiments equals ``Resize(scale=(1333, 800), keep_ratio=True)`` + the configs'
  normalisation + padding to 32.
- Training: one seeded ADE20K ratio-range resize and one COCO multi-scale resize equal mmcv's on
  the same scale, image and label map.
"""

from __future__ import annotations

from pathlib import Path

import mmseg_peer as peer
import numpy as np
import pytest
import torch
from cli_utils import compose_cfg, run_cfg
from docs_blocks import blocks, section
from omegaconf import open_dict
from PIL import Image
from test_convert_mmseg import EXPERIMENTS as CONVERTED
from torchvision import tv_tensors
from torchvision.transforms import v2

from knet_lightning.cli import build_datamodule
from knet_lightning.data.ade20k import ADE20K_CLASSES
from knet_lightning.data.mmseg_pipeline import RatioRangeResize
from knet_lightning.data.transforms import ResizeShortestEdge, collate_batch
from knet_lightning.inference.segmenter import Segmenter
from knet_lightning.postprocess.rescale import rescale_maps

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# MMSegmentation's config -> (our experiment, its overrides): the four R50 configs and Swin-T
EXPERIMENTS = {name: pair for name, pair in CONVERTED.items() if name != "swin-l"}
# the bar: the same class on >= 99.99 % of pixels, logits within 2e-5 x max |logit|
SAME_CLASS = 0.9999
LOGIT_TOL = 2e-5
# (h, w) of the test images, none a multiple of 32. At the configs' test scale (2048, 512): the
# first two are enlarged (333x500 -> 512x769, 480x360 -> 683x512), the third shrunk (1100x1500 ->
# 512x698). CI runs the same path at a quarter of the scale (512, 128): 97x75 and 100x133 enlarged,
# 300x410 shrunk.
FULL_SCALE = ((2048, 512), [(333, 500), (480, 360), (1100, 1500)])
CI_SCALE = ((512, 128), [(97, 75), (100, 133), (300, 410)])


def _image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A PNG of smooth colour blobs plus noise: the resize's rounding matters at every pixel."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = [np.sin(rng.uniform(3, 12) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(3, 12) * yy) for _ in range(3)]
    base = (np.stack(channels, -1) * 90 + 128 + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(base).save(path)
    return path


def _converted(tmp_path: Path, name: str, img_scale: tuple[int, int]) -> tuple[Path, Path]:
    """MMSegmentation's checkpoint of ``name`` with random weights, and ours converted from it
    with the experiment's inference settings at ``img_scale``."""
    ref = peer.randomize_(peer.build_mmseg_knet(name, init="empty"), seed=5).eval()
    source = tmp_path / f"{name}.pth"
    peer.save_mmseg_checkpoint(ref, source, list(ADE20K_CLASSES), save_optimizer=False, save_param_scheduler=False)
    experiment, extra = EXPERIMENTS[name]
    output = tmp_path / "converted.ckpt"
    # mode=convert as a user runs it (ADE20K's classes are known without its files)
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", "mode=convert", f"convert_source={source}",
                                 f"convert_output={output}", f"data.root={tmp_path / 'no_ade20k'}",
                                 f"data.img_scale=[{img_scale[0]},{img_scale[1]}]", *extra])  # fmt: skip
    run_cfg(cfg)
    return source, output


def _segmenter_logits(seg: Segmenter, paths: list[Path]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Segmenter's label maps, and the logits at the image size from which it took their argmax
    (what its task's post-processing received, rescaled as that post-processing rescales)."""
    task = seg.module.task
    seen: list[torch.Tensor] = []
    postprocess = task.postprocess

    def recording(stage, b, image_size, padded_size, output_size):  # type: ignore[no-untyped-def]
        seen.append(rescale_maps(stage.mask_logits[b], image_size, padded_size, output_size))
        return postprocess(stage, b, image_size, padded_size, output_size)

    task.postprocess = recording
    try:
        results = seg([str(p) for p in paths])
    finally:
        del task.postprocess
    return [r.semantic for r in results], seen


def _whole_path_parity(tmp_path: Path, name: str, scale: tuple[int, int], sizes: list[tuple[int, int]]) -> None:
    source, converted = _converted(tmp_path, name, scale)
    paths = [_image(tmp_path / f"image{i}.png", size, seed=i) for i, size in enumerate(sizes)]
    theirs = peer.init_mmseg_model(name, source, test_scale=scale)
    peer.import_mmseg()
    from mmseg.apis import inference_model

    with torch.no_grad():  # one call an image: its test mode stacks a batch of one size only
        expected = [inference_model(theirs, str(p)) for p in paths]
    seg = Segmenter.from_checkpoint(converted, precision="fp32")
    assert seg.settings["resize_backend"] == "cv2"
    labels, logits = _segmenter_logits(seg, paths)
    for size, sample, label, logit in zip(sizes, expected, labels, logits):
        ref_logits = sample.seg_logits.data
        ref_label = sample.pred_sem_seg.data[0]
        assert logit.shape == ref_logits.shape and label.shape == ref_label.shape == size
        same = (label == ref_label).float().mean().item()
        rel = ((logit - ref_logits).abs().max() / ref_logits.abs().max()).item()
        print(f"{name} {size[0]}x{size[1]} at scale {scale}: same class {100 * same:.4f} %, "
              f"max |logit diff| / max |logit| {rel:.1e}")  # fmt: skip
        assert same >= SAME_CLASS, (name, size, same)
        assert rel <= LOGIT_TOL, (name, size, rel)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_segmenter_equals_mmsegmentation_inference_model(tmp_path: Path, name: str) -> None:
    _whole_path_parity(tmp_path, name, *CI_SCALE)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_segmenter_equals_mmsegmentation_inference_model_at_the_configs_scale(tmp_path: Path, name: str) -> None:
    _whole_path_parity(tmp_path, name, *FULL_SCALE)


# ------------------------------------------------------------------ detection: mmdet 2.x's test input
@pytest.mark.parametrize("experiment", ["knet_r50_coco_panoptic_1x", "knet_r50_coco_instance_ms3x"])
def test_detection_network_input_equals_mmcv_resize_normalise_pad(tmp_path: Path, experiment: str) -> None:
    peer.import_mmseg()
    import mmcv
    from mmcv.transforms import Resize

    cfg = compose_cfg(tmp_path, [f"experiment={experiment}"])
    with open_dict(cfg):
        cfg.data.root = str(tmp_path / "no_coco")
    datamodule = build_datamodule(cfg)
    ops = datamodule.eval_transforms.transforms
    resizes = [op for op in ops if isinstance(op, ResizeShortestEdge)]
    assert [(op.short_edge, op.max_size, op.backend) for op in resizes] == [((800, 800), 1333, "cv2")]
    normalize = next(op for op in ops if isinstance(op, v2.Normalize))
    # the official configs' img_norm_cfg: mean / std on the 0-255 scale, to_rgb
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    rng = np.random.default_rng(0)
    for h, w in [(480, 640), (1500, 2000), (427, 301)]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        resized = Resize(scale=(1333, 800), keep_ratio=True)({"img": rgb})["img"]
        expected = mmcv.impad_to_multiple(mmcv.imnormalize(resized, mean, std, to_rgb=False), 32, pad_val=0)
        image, target = datamodule.eval_transforms(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)),
                                                   {"orig_size": (h, w)})  # fmt: skip
        batch = collate_batch([(image, target)], size_divisor=32)
        ours = batch["images"][0].permute(1, 2, 0).numpy()
        assert batch["image_sizes"][0] == resized.shape[:2]
        assert ours.shape == expected.shape
        # 0 difference after the uint8 resize: undo our normalisation exactly and compare pixels
        pixels = np.rint((ours[: resized.shape[0], : resized.shape[1]] * np.array(normalize.std)
                          + np.array(normalize.mean)) * 255).astype(np.uint8)  # fmt: skip
        np.testing.assert_array_equal(pixels, resized)
        # the normalised, padded input: equal up to float32 rounding of the two formulas
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)


# ------------------------------------------------------------------ training resizes
def test_ade20k_ratio_range_resize_equals_mmcv_on_the_same_scale() -> None:
    peer.import_mmseg()
    from mmcv.transforms import Resize

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    labels = rng.integers(0, 150, (375, 500), dtype=np.uint8)
    resize = RatioRangeResize((2048, 512), (0.5, 2.0))
    for seed in range(3):
        torch.manual_seed(seed)
        image, target = resize(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)),
                               {"sem_seg": tv_tensors.Mask(torch.from_numpy(labels).long())})  # fmt: skip
        # the ratio our transform drew; mmseg 1.x's RandomResize scales (2048, 512) by it
        torch.manual_seed(seed)
        ratio = 0.5 + 1.5 * float(torch.rand(()))
        scale = (int(2048 * ratio), int(512 * ratio))
        expected = Resize(scale=scale, keep_ratio=True)({"img": rgb, "gt_seg_map": labels})
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected["img"])
        np.testing.assert_array_equal(target["sem_seg"].numpy(), expected["gt_seg_map"])


def test_coco_multiscale_resize_equals_mmcv_on_the_same_scale() -> None:
    peer.import_mmseg()
    import mmcv
    from mmcv.transforms import Resize

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (3, 480, 640)).astype(bool)
    resize = ResizeShortestEdge((640, 800), 1333)
    for seed in range(3):
        torch.manual_seed(seed)
        image, target = resize(tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1)),
                               {"masks": tv_tensors.Mask(torch.from_numpy(masks))})  # fmt: skip
        torch.manual_seed(seed)
        short = int(torch.randint(640, 801, ()))
        expected = Resize(scale=(1333, short), keep_ratio=True)({"img": rgb})["img"]
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
        # mmdet 2.x's BitmapMasks.rescale: mmcv.imrescale(mask, scale, interpolation="nearest")
        for k in range(3):
            np.testing.assert_array_equal(
                target["masks"][k].numpy(),
                mmcv.imrescale(masks[k].astype(np.uint8), (1333, short), interpolation="nearest").astype(bool),
            )


# ------------------------------------------------------------------ fp32 for published numbers
def test_published_weights_run_in_fp32_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.core.hydra_config import HydraConfig

    import knet_lightning.inference.segmenter as segmenter
    from knet_lightning.cli import published_numbers_in_fp32

    _, converted = _converted(tmp_path, "fcn", CI_SCALE[0])
    # where bf16 is fast, "auto" picks it for trained checkpoints, but not for published weights
    monkeypatch.setattr(segmenter, "bf16_supported", lambda device: True)
    assert Segmenter.from_checkpoint(converted).precision == "fp32"
    assert Segmenter.from_checkpoint(converted, precision="bf16").precision == "bf16"

    # mode=eval: the experiment's bf16 (trainer=gpu) gives way to fp32; the command line's is kept
    for overrides, expected in [([], "32-true"), (["trainer.precision=bf16-mixed"], "bf16-mixed")]:
        cfg = compose_cfg(tmp_path, ["experiment=knet_fcn_r50_ade20k_80k", "mode=eval", f"ckpt_path={converted}",
                                     *overrides])  # fmt: skip
        with open_dict(cfg):
            cfg.trainer.precision = "bf16-mixed"
        HydraConfig.instance().set_config(cfg)
        published_numbers_in_fp32(cfg)
        assert cfg.trainer.precision == expected, overrides


# ------------------------------------------------------------------ the documented ms+flip command
REPRODUCING = "docs/guides/reproducing-the-paper.md"


def multi_scale_flip_command() -> str:
    """The one command of the "Multi-scale + flip testing" section of "Reproducing the paper"."""
    (block,) = blocks(section(REPRODUCING, "## Multi-scale + flip testing"))
    (command,) = [line for line in block.splitlines() if line.strip()]
    return command


def test_documented_multi_scale_flip_command_evaluates_a_converted_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``mode=eval ... model.test_time.tta=true`` command of "Reproducing the paper", as
    written, on a converted MMSegmentation FCN checkpoint (random weights) named as on the page and
    a tiny ADE20K folder standing in for ``/data/ade``."""
    import json
    import shlex

    from test_ade20k import _write_fixture

    command = multi_scale_flip_command()
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "knet_lightning"] and "model.test_time.tta=true" in args
    _write_fixture(tmp_path / "ade")
    _, converted = _converted(tmp_path / "convert", "fcn", CI_SCALE[0])
    ckpt = next(a.split("=", 1)[1] for a in args if a.startswith("ckpt_path="))
    converted.rename(tmp_path / ckpt)  # the page's file name, in the folder the command runs in
    monkeypatch.chdir(tmp_path)
    overrides = [a.replace("/data/ade", str(tmp_path / "ade")) for a in args[3:]]
    cfg = compose_cfg(tmp_path / "eval", overrides)
    with caplog.at_level("INFO", logger="knet_lightning"):
        run_cfg(cfg)
    assert "test-time strategy: multi-scale [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] + flip, whole image" in caplog.text
    assert "precision: 32-true" in caplog.text
    metrics = json.loads((tmp_path / "eval" / "run" / "metrics.json").read_text())
    assert set(metrics) >= {"test/miou", "test/acc"}
