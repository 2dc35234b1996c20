"""Test-time strategies of the semantic task (``model.test_time``): sliding windows and multi-scale
+ flip, by hand on fake networks, and against MMSegmentation 1.2.2 (its ``slide_inference`` and its
``SegTTAModel`` fed by ADE20K's ``tta_pipeline``) with the same random weights in both networks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import mmseg_peer as peer
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_utils import compose_cfg, run_cfg
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

from knet_lightning import Segmenter
from knet_lightning.checkpoint.io import atomic_torch_save
from knet_lightning.checkpoint.keys import INFERENCE_KEY, MODEL_CONFIG_KEY
from knet_lightning.cli import build_datamodule, build_model
from knet_lightning.data.ade20k import ADE20KDataModule
from knet_lightning.data.resize import resize_image
from knet_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from knet_lightning.inference.test_time import (
    TestTimeSettings,
    multi_scale_flip,
    recover_uint8_image,
    run_test_time,
    slide_inference,
    slide_windows,
    tta_view_size,
)
from knet_lightning.models.outputs import StageOutput
from knet_lightning.module import KNetModule
from knet_lightning.postprocess.merge import semantic_inference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# the acceptance bar: the same class on 99.99 % of the pixels, values to 2e-5 x max |value| (fp32)
SAME_CLASS = 0.9999
VALUE_TOL = 2e-5
LOADER = ["data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false"]


def _stage(logits: Tensor) -> StageOutput:
    return StageOutput(logits, None, logits.new_zeros((*logits.shape[:2], 0)))


# ------------------------------------------------------------------------------ settings


def test_settings_validate_and_name_the_key() -> None:
    assert TestTimeSettings().is_plain and TestTimeSettings().scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    s = TestTimeSettings.from_config({"mode": "slide", "crop_size": [512, 512], "stride": (341, 341)})
    assert (s.crop_size, s.stride, s.is_plain) == ([512, 512], [341, 341], False)
    with pytest.raises(ValueError, match=r"model\.test_time\.mode='sliding'"):
        TestTimeSettings(mode="sliding")
    with pytest.raises(ValueError, match=r"model\.test_time\.mode=slide needs model\.test_time\.crop_size and "
                                         r"model\.test_time\.stride"):  # fmt: skip
        TestTimeSettings(mode="slide")
    with pytest.raises(ValueError, match=r"model\.test_time\.stride=\[0, 4\]"):
        TestTimeSettings(mode="slide", crop_size=[8, 8], stride=[0, 4])
    with pytest.raises(ValueError, match=r"model\.test_time\.crop_size=512: expected \(height, width\)"):
        TestTimeSettings(mode="slide", crop_size=512, stride=[4, 4])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model\.test_time\.scales=\[0\.5, -1\.0\]"):
        TestTimeSettings(tta=True, scales=[0.5, -1.0])
    with pytest.raises(ValueError, match=r"model\.test_time\.scales=\[\]"):
        TestTimeSettings(tta=True, scales=[])
    with pytest.raises(ValueError, match=r"model\.test_time: unknown key\(s\) \['scale'\]"):
        TestTimeSettings.from_config({"scale": [1.0]})


# ------------------------------------------------------------------------------ sliding window


def test_slide_windows_as_mmsegmentation_places_them() -> None:
    # rows: max(10 - 4 + 3 - 1, 0) // 3 + 1 = 3 from y = 0, 3, 6; columns: (13 - 6 + 3) // 4 + 1 = 3 from
    # x = 0, 4, 8, the last (8..14) moved back inside the image to 7..13
    rows, cols = [(0, 4), (3, 7), (6, 10)], [(0, 6), (4, 10), (7, 13)]
    assert slide_windows(10, 13, (4, 6), (3, 4)) == [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]
    # an image smaller than the crop: one window, the image itself (not padded)
    assert slide_windows(5, 7, (8, 8), (4, 4)) == [(0, 5, 0, 7)]
    assert slide_windows(5, 20, (8, 8), (6, 6)) == [(0, 5, 0, 8), (0, 5, 6, 14), (0, 5, 12, 20)]


def test_slide_sums_each_window_and_divides_by_the_count() -> None:
    """A fake network answering window k (in order) with the constant k + 1 at half resolution:
    each pixel's value is the mean of the numbers of the windows covering it."""
    calls: list[tuple[int, int]] = []

    def network(x: Tensor) -> list[StageOutput]:
        calls.append(tuple(x.shape[-2:]))
        k = float(len(calls))
        h, w = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
        return [_stage(torch.full((x.shape[0], 2, h, w), k)), _stage(torch.full((x.shape[0], 2, h, w), -k))]

    images = torch.randn(2, 3, 10, 13)
    first, last = slide_inference(network, images, (4, 6), (3, 4), stages=[0, 1])
    windows = slide_windows(10, 13, (4, 6), (3, 4))
    assert calls == [(y2 - y1, x2 - x1) for y1, y2, x1, x2 in windows] == [(4, 6)] * 9
    total, count = torch.zeros(10, 13), torch.zeros(10, 13)
    for k, (y1, y2, x1, x2) in enumerate(windows):
        total[y1:y2, x1:x2] += k + 1
        count[y1:y2, x1:x2] += 1
    assert first.shape == last.shape == (2, 2, 10, 13)
    torch.testing.assert_close(first, (total / count).expand(2, 2, 10, 13))
    torch.testing.assert_close(last, -first)
    # by hand: pixel (0, 0) in window 1 only; (3, 4) in windows 1, 2, 4, 5; (9, 12) in window 9 only;
    # column 7 in windows 2 and 3 of each row band (the moved-back last window)
    assert first[0, 0, 0, 0] == 1 and first[0, 0, 3, 4] == (1 + 2 + 4 + 5) / 4 and first[0, 0, 9, 12] == 9
    assert first[0, 0, 0, 7] == (2 + 3) / 2


def _conv_network(num_classes: int = 5, stride: int = 4, seed: int = 0) -> nn.Module:
    """A fake semantic network: a random 3x3 conv, logits at ``stride``, the same for every stage."""
    conv = nn.Conv2d(3, num_classes, 3, padding=1)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))

    class Net(nn.Module):
        def forward(self, x: Tensor) -> list[StageOutput]:
            logits = F.avg_pool2d(conv(x), stride, ceil_mode=True)
            return [_stage(logits), _stage(2 * logits)]

    return Net()


def test_slide_with_a_crop_over_the_image_is_whole_inference() -> None:
    net = _conv_network()
    images = torch.randn(1, 3, 21, 30)
    batch = {"images": images, "image_sizes": [(21, 30)], "targets": [{"orig_size": (21, 30)}]}
    for crop in [(21, 30), (32, 64)]:
        settings = TestTimeSettings(mode="slide", crop_size=list(crop), stride=[8, 8])
        outputs = run_test_time(net, batch, settings, stages=[1])
        assert outputs[0] is None and outputs[1].mask_logits.shape == (1, 5, 21, 30)
        last = run_test_time(net, batch, settings, stages=[-1])  # as predict_batch reads the last stage
        assert len(last) == 2 and last[0] is None and torch.equal(last[1].mask_logits, outputs[1].mask_logits)
        whole = net(images)[1].mask_logits
        torch.testing.assert_close(outputs[1].mask_logits, F.interpolate(whole, (21, 30), mode="bilinear"))
        assert torch.equal(semantic_inference(outputs[1].mask_logits[0], (21, 30), (21, 30), (40, 50)),
                           semantic_inference(whole[0], (21, 30), (21, 30), (40, 50)))  # fmt: skip


# ------------------------------------------------------------------------------ multi-scale + flip


@pytest.mark.parametrize("size", [(83, 117), (512, 683), (375, 500), (7, 3), (101, 99)])
def test_view_sizes_and_pixels_are_mmcvs_resize(size: tuple[int, int]) -> None:
    peer.import_mmseg()
    from mmcv.transforms import Resize

    h, w = size
    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for factor in [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 0.3, 2.1]:
        result = Resize(scale_factor=factor, keep_ratio=True)({"img": image.copy()})
        assert tta_view_size(h, w, factor) == tuple(result["img_shape"]), (size, factor)
        if max(size) < 200:
            ours = resize_image(torch.from_numpy(image).permute(2, 0, 1), tta_view_size(h, w, factor), "cv2")
            np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), result["img"])


def _normalize() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])


def test_the_uint8_image_is_recovered_exactly_from_the_normalised_one() -> None:
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 50), dtype=np.uint8))
    image[:, 0, :3] = torch.tensor([0, 255, 128], dtype=torch.uint8)[:, None]
    assert torch.equal(recover_uint8_image(_normalize()(image), IMAGENET_MEAN, IMAGENET_STD), image)


def test_multi_scale_flip_on_a_network_computed_by_hand() -> None:
    """The network returns the normalised input plus ``c x column`` for class c (not flip
    equivariant) at full resolution. At scale 1 the flipped view, flipped back, has
    ``c x (W - 1 - column)``; at scale 2 (cv2 doubling then bilinear halving) the same up to the
    interpolation; the result is the mean of the views' softmaxes."""

    def network(x: Tensor) -> list[StageOutput]:
        ramp = torch.arange(x.shape[-1], dtype=torch.float32)
        return [_stage(x + torch.arange(3.0).view(1, 3, 1, 1) * ramp / 10)]

    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 9, 12), dtype=np.uint8))
    x = _normalize()(image)
    col = torch.arange(12.0)
    c = torch.arange(3.0).view(3, 1, 1)
    plain, flipped = (x + c * col / 10).softmax(0), (x + c * col.flip(0) / 10).softmax(0)

    one = TestTimeSettings(tta=True, scales=[1.0], flip=False)
    (probs,) = multi_scale_flip(network, image, one, IMAGENET_MEAN, IMAGENET_STD, [0], "cpu")
    torch.testing.assert_close(probs, plain)
    both = TestTimeSettings(tta=True, scales=[1.0])
    (probs,) = multi_scale_flip(network, image, both, IMAGENET_MEAN, IMAGENET_STD, [0], "cpu")
    torch.testing.assert_close(probs, (plain + flipped) / 2)

    # scale 2: the view is cv2's x2 of the image (18 x 24), its logits come back by bilinear halving
    two = TestTimeSettings(tta=True, scales=[1.0, 2.0])
    (probs,) = multi_scale_flip(network, image, two, IMAGENET_MEAN, IMAGENET_STD, [0], "cpu")
    big = _normalize()(resize_image(image, (18, 24), "cv2"))
    col2 = torch.arange(24.0)
    views = [plain, flipped]
    for ramp in (col2, col2.flip(0)):
        views.append(F.interpolate((big + c * ramp / 10)[None], (9, 12), mode="bilinear")[0].softmax(0))
    torch.testing.assert_close(probs, sum(views) / 4)


def test_tta_refuses_images_that_are_not_at_their_original_size() -> None:
    net = _conv_network()
    images = torch.randn(1, 3, 16, 20)
    batch = {"images": images, "image_sizes": [(16, 20)], "targets": [{"orig_size": (32, 40), "file_name": "a.png"}],
             "mean": IMAGENET_MEAN, "std": IMAGENET_STD}  # fmt: skip
    with pytest.raises(ValueError, match=r"a\.png reaches the network at 16x20.*not at its original size 32x40.*"
                                         r"keep_eval_size"):  # fmt: skip
        run_test_time(net, batch, TestTimeSettings(tta=True), stages=[1])
    del batch["mean"]
    batch["targets"][0]["orig_size"] = (16, 20)
    with pytest.raises(ValueError, match="no 'mean'/'std'"):
        run_test_time(net, batch, TestTimeSettings(tta=True), stages=[1])


# ------------------------------------------------------------------------------ other tasks


class _FakeNet(nn.Module):
    num_classes, num_things, num_proposals, num_stages = 3, 2, 4, 1


@pytest.mark.parametrize("task", ["panoptic", "instance"])
@pytest.mark.parametrize("test_time", [{"tta": True}, {"mode": "slide", "crop_size": [64, 64], "stride": [32, 32]}])
def test_other_tasks_refuse_the_semantic_strategies(task: str, test_time: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=rf"model\.test_time: .* not available for the {task} task: only the "
                                         r"semantic task has sliding-window and multi-scale \+ flip inference"):  # fmt: skip
        KNetModule(_FakeNet(), nn.Identity(), task=task, test_time=test_time)
    KNetModule(_FakeNet(), nn.Identity(), task=task, test_time={"mode": "whole", "scales": [1.0]})  # nothing to refuse


def test_the_instance_config_refuses_tta_from_the_command_line(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, ["model=knet_instance", "model.num_stages=1", "model.net.backbone_depth=18",
                                 "model.test_time.tta=true"])  # fmt: skip
    with pytest.raises(Exception, match=r"model\.test_time: multi-scale \[0\.5, .*\] \+ flip, whole image is not "
                                        r"available for the instance task: only the semantic task"):  # fmt: skip
        build_model(cfg, build_datamodule(cfg).class_info)


# ------------------------------------------------------------------------------ parity with MMSegmentation


def _write_ade(root: Path, rgb: np.ndarray, seed: int = 0) -> tuple[Path, Path]:
    """One validation image (PNG, exact pixels) and a label map in the ADEChallengeData2016 layout."""
    base = root / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        (base / kind / "validation").mkdir(parents=True, exist_ok=True)
    image, label = (
        base / "images" / "validation" / "ADE_val_1.png",
        base / "annotations" / "validation" / "ADE_val_1.png",
    )
    Image.fromarray(rgb).save(image)
    labels = np.random.default_rng(seed).integers(0, 151, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(labels, mode="L").save(label)
    return image, label


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, KNetModule]:
    """MMSegmentation's K-Net FCN R50 with random weights and ours with the same weights."""
    from test_convert_mmseg import _ours

    from knet_lightning.checkpoint.convert import mapping_for_task
    from knet_lightning.checkpoint.convert.backbones import backbone_from_published
    from knet_lightning.checkpoint.convert.mapping import convert_state_dict

    peer.import_mmseg()
    from mmseg.registry import MODELS

    ref = peer.randomize_(peer.build_mmseg_knet("fcn", init="empty"), seed=3).eval()
    preprocessor = dict(ref.peer_cfg.data_preprocessor)  # mean/std on the 0-255 scale, BGR -> RGB
    ref.data_preprocessor = MODELS.build(preprocessor)
    ours = _ours(tmp_path_factory.mktemp("ours"), "fcn")
    state = backbone_from_published(ref.state_dict(), ours.net.backbone)
    ours.net.load_state_dict(convert_state_dict(state, ours.net.state_dict(), mapping_for_task("semantic"), "peer"))
    ours.channels_last = False  # the layout the logits parity of test_convert_mmseg.py runs in
    return ref, ours.eval()


def _our_batch(root: Path) -> dict[str, Any]:
    """The ADE20K data module's test batch with its evaluation pipeline minus the resize."""
    dm = ADE20KDataModule(root, num_workers=0, persistent_workers=False, val_batch_size=1)
    dm.keep_eval_size()
    return next(iter(dm.test_dataloader()))


def _mmseg_data(pipeline_cfg: list[dict[str, Any]], image: Path, label: Path) -> dict[str, Any]:
    from mmengine.dataset import Compose, pseudo_collate

    results = Compose(pipeline_cfg)({"img_path": str(image), "seg_map_path": str(label), "reduce_zero_label": True,
                                     "seg_fields": []})  # fmt: skip
    return pseudo_collate([results])


def _report(name: str, ours: Tensor, theirs: Tensor, ours_pred: Tensor, theirs_pred: Tensor) -> None:
    same = (ours_pred == theirs_pred).float().mean().item()
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    print(f"\n{name}: same class on {100 * same:.4f} % of {ours_pred.numel()} pixels; max |diff| {diff:.2e}, "
          f"/ max |value| {scale:.3g} = {diff / scale:.2e}")  # fmt: skip
    assert same >= SAME_CLASS, name
    assert diff <= VALUE_TOL * scale, name


def test_slide_equals_mmsegmentations_slide_inference(pair: tuple[nn.Module, KNetModule], tmp_path: Path) -> None:
    """An image of 100 x 130 in windows of 60 x 70 every 25 x 35: 3 x 3 windows, the last row and
    column moved back inside the image (y 50 -> 40, x 70 -> 60)."""
    ref, ours = pair
    from mmengine.config import ConfigDict

    rgb = np.random.default_rng(5).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    image, label = _write_ade(tmp_path, rgb)
    crop, stride = (60, 70), (25, 35)
    assert len(slide_windows(100, 130, crop, stride)) == 9
    ref.test_cfg = ConfigDict(mode="slide", crop_size=crop, stride=stride)
    try:
        pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
        with torch.no_grad():
            (theirs,) = ref.test_step(_mmseg_data(pipeline, image, label))
    finally:
        ref.test_cfg = ConfigDict(mode="whole")

    ours.test_time = TestTimeSettings(mode="slide", crop_size=list(crop), stride=list(stride))
    batch = _our_batch(tmp_path)
    s = ours.num_stages
    with torch.no_grad():
        ((outputs, part),) = ours.network_outputs(batch, [s])
        pred = ours.task.predict(outputs[s], part)[0]
    assert outputs[s].mask_logits.shape == (1, 150, 100, 130)
    _report("slide", outputs[s].mask_logits[0], theirs.seg_logits.data, pred, theirs.pred_sem_seg.data[0])


class _Recording:
    """Keeps the views ``SegTTAModel.merge_preds`` merges, to read their averaged probabilities."""

    def __init__(self, model: Any) -> None:
        self.model, self.views = model, None
        merge = model.merge_preds

        def recording(data_samples_list: Any) -> Any:
            self.views = data_samples_list
            return merge(data_samples_list)

        model.merge_preds = recording


def test_multi_scale_flip_equals_mmsegmentations_seg_tta_model(pair: tuple[nn.Module, KNetModule],
                                                             tmp_path: Path) -> None:  # fmt: skip
    """ADE20K's tta_pipeline with three of its scales on an 83 x 117 image (views 42 x 59, 83 x 117,
    104 x 146, each also flipped)."""
    ref, ours = pair
    peer.import_mmseg()
    from mmseg.models import SegTTAModel

    scales = [0.5, 1.0, 1.25]
    rgb = np.random.default_rng(6).integers(0, 256, (83, 117, 3), dtype=np.uint8)
    image, label = _write_ade(tmp_path, rgb)
    pipeline = copy.deepcopy(ref.peer_cfg.tta_pipeline)
    assert pipeline[1]["type"] == "TestTimeAug" and [t["scale_factor"] for t in pipeline[1]["transforms"][0]] == [
        0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # fmt: skip
    pipeline[1]["transforms"][0] = [t for t in pipeline[1]["transforms"][0] if t["scale_factor"] in scales]
    tta = SegTTAModel(module=ref)
    recording = _Recording(tta)
    with torch.no_grad():
        (theirs,) = tta.test_step(_mmseg_data(pipeline, image, label))
    (views,) = recording.views
    assert [tuple(v.img_shape) for v in views] == [(42, 59), (42, 59), (83, 117), (83, 117), (104, 146), (104, 146)]
    assert [tta_view_size(83, 117, r) for r in scales] == [(42, 59), (83, 117), (104, 146)]
    assert [bool(v.flip) for v in views] == [False, True] * 3
    # merge_preds' averaged probabilities, summed in its order
    expected = torch.zeros_like(views[0].seg_logits.data)
    for view in views:
        expected += view.seg_logits.data.softmax(dim=0)
    expected /= len(views)
    assert torch.equal(expected.argmax(0), theirs.pred_sem_seg.data[0])

    ours.test_time = TestTimeSettings(tta=True, scales=scales)
    batch = _our_batch(tmp_path)
    assert batch["image_sizes"] == [(83, 117)]
    s = ours.num_stages
    with torch.no_grad():
        ((outputs, part),) = ours.network_outputs(batch, [s])
        pred = ours.task.predict(outputs[s], part)[0]
    _report("multi-scale + flip", outputs[s].mask_logits[0], expected, pred, theirs.pred_sem_seg.data[0])


# ------------------------------------------------------------------------------ end to end

TINY = ["experiment=knet_upernet_r50_ade20k_80k", *LOADER, "data.img_scale=[64,32]", "model.num_stages=1",
        "model.net.pretrained=false", "model.net.channels=32", "model.net.updator_channels=32",
        "model.net.aux_channels=16", "model.net.feedforward_channels=64", "model.net.num_heads=2",
        "model.net.backbone_depth=18"]  # fmt: skip


def test_mode_eval_and_segmenter_with_multi_scale_flip(tmp_path: Path) -> None:
    """A tiny ADE20K checkpoint evaluated with ``model.test_time.tta=true``: it reports test/miou,
    and a Segmenter with ``test_time={"tta": True, ...}`` predicts what the evaluation exported."""
    from test_ade20k import _write_fixture

    _write_fixture(tmp_path / "ade")
    data = [f"data.root={tmp_path / 'ade'}"]
    cfg = compose_cfg(tmp_path / "build", [*TINY, *data])
    dm = build_datamodule(cfg)
    module = build_model(cfg, dm.class_info)
    assert module.test_time.is_plain  # the default: whole image
    module.inference_config = dm.inference_settings()
    ckpt = tmp_path / "tiny.ckpt"
    atomic_torch_save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                       "pytorch-lightning_version": "2.0.0", "epoch": 0, "global_step": 0,
                       MODEL_CONFIG_KEY: module.model_config, INFERENCE_KEY: module.inference_config}, ckpt)  # fmt: skip

    tta = ["model.test_time.tta=true", "model.test_time.scales=[0.5,1.0,1.5]"]
    cfg = compose_cfg(tmp_path / "eval", [*TINY, *data, f"ckpt_path={ckpt}", "export_predictions=true", *tta],
                      config_name="eval")  # fmt: skip
    run_cfg(cfg)
    metrics = json.loads((tmp_path / "eval" / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/miou"] <= 1.0
    (png,) = sorted((tmp_path / "eval" / "run" / "predictions" / "semantic").glob("*.png"))
    exported = np.array(Image.open(png))
    assert exported.shape == (20, 16)

    seg = Segmenter.from_checkpoint(ckpt, precision="fp32")
    assert seg.test_time.is_plain  # the checkpoint's
    seg = Segmenter.from_checkpoint(ckpt, precision="fp32", test_time={"tta": True, "scales": [0.5, 1.0, 1.5]})
    assert seg.test_time.tta and seg.test_time.flip and seg.test_time.scales == [0.5, 1.0, 1.5]
    val_image = tmp_path / "ade" / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000001.png"
    result = seg(val_image)
    assert result.semantic.shape == (20, 16)
    # the same prediction as the evaluation's export (ADE20K's ids: class + 1)
    np.testing.assert_array_equal(np.asarray(result.dataset_ids)[result.semantic.numpy()], exported)
    # and sliding windows over the resized image
    seg = Segmenter.from_checkpoint(ckpt, precision="fp32",
                                    test_time={"mode": "slide", "crop_size": [24, 24], "stride": [16, 16]})  # fmt: skip
    assert seg(np.asarray(Image.open(val_image))).semantic.shape == (20, 16)
