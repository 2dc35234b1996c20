"""ONNX export of a trained K-Net (``export_onnx``) and ``Segmenter(backend="onnxruntime")``.

One tiny checkpoint per task (panoptic, instance, semantic), written in the training run's format
from a freshly built network, is exported once; ONNX Runtime on the CPU must match eager PyTorch
at several batch sizes and image sizes from that one file (dynamic shapes), and a Segmenter on
the file alone must give the segments of the PyTorch Segmenter on the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from cli_utils import compose_cfg  # noqa: E402

from knet_lightning import SegmentationResult, Segmenter  # noqa: E402
from knet_lightning.checkpoint.io import atomic_torch_save, load_checkpoint_file  # noqa: E402
from knet_lightning.checkpoint.keys import INFERENCE_KEY, MODEL_CONFIG_KEY  # noqa: E402
from knet_lightning.cli import build_model  # noqa: E402
from knet_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from knet_lightning.inference.onnx_export import export_onnx  # noqa: E402
from knet_lightning.inference.onnx_runtime import OnnxRuntimeNetwork  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# the smallest networks of each kind; low thresholds, stored in the checkpoint, so that a network
# of random weights predicts segments to compare
_DETECTION = ["~experiment", "data=synthetic", "model.num_proposals=6", "model.num_stages=1",
              "model.net.backbone_depth=18", "model.net.backbone_base_channels=16", "model.net.channels=32",
              "model.net.num_groups=8", "model.net.feedforward_channels=64", "model.net.num_heads=2"]  # fmt: skip
CONFIGS = {
    "panoptic": [*_DETECTION, "model.postprocess.object_mask_thr=0.0", "model.postprocess.overlap_thr=0.1"],
    "instance": [*_DETECTION, "model=knet_instance", "model.postprocess.max_per_img=20"],
    "semantic": ["~experiment", "data=synthetic", "model=knet_semantic", "model.num_stages=1",
                 "model.net.backbone_depth=18", "model.net.channels=32", "model.net.aux_channels=16",
                 "model.net.feedforward_channels=64", "model.net.num_heads=2", "model.net.updator_channels=32"],
    # the Swin backbone (Swin-T: the smallest arch) under the tiny panoptic head: its window padding and
    # shifted-window masks depend on the input size
    "panoptic-swin": [*_DETECTION, "model.net.backbone_type=swin", "model.net.swin_arch=tiny",
                      "model.postprocess.object_mask_thr=0.0", "model.postprocess.overlap_thr=0.1"],
}  # fmt: skip
CONFIGS["semantic-swin"] = [*CONFIGS["semantic"], "model.net.backbone_type=swin", "model.net.swin_arch=tiny"]
SIZES = [(1, 64, 64), (2, 96, 160), (1, 128, 96)]  # (batch, height, width): square, wide, tall


def write_checkpoint(tmp: Path, task: str) -> Path:
    """A checkpoint in the format a training run writes (state dict, hyper-parameters, model
    config, inference settings), of a freshly built tiny network (``task``: a key of CONFIGS):
    no training steps needed."""
    cfg = compose_cfg(tmp, CONFIGS[task])
    torch.manual_seed(0)
    names = ["circle", "square", "triangle", "star", "sky", "grass", "water"]
    classes = SimpleNamespace(names=names, isthing=[i < 4 for i in range(7)],
                              colors=[(40 * i, 255 - 30 * i, 90) for i in range(7)])  # fmt: skip
    module = build_model(cfg, classes)
    if not task.startswith("semantic"):
        # scores away from the 0.01 prior, so that the post-processing keeps and ranks segments
        torch.nn.init.normal_(module.net.update_heads[-1].fc_cls.bias, std=1.0)
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        MODEL_CONFIG_KEY: module.model_config,
        INFERENCE_KEY: {
            "short_edge": None,
            "max_size": None,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "size_divisor": 32,
            "dataset_ids": [1, 2, 3, 4, 101, 102, 103],
        },  # fmt: skip
    }
    path = tmp / f"{task}.ckpt"
    atomic_torch_save(checkpoint, path)
    return path


Export = Callable[[str], tuple[Path, Path]]
# An export is a single-threaded trace of 10-30 s on a slow core, so the tests that export run in
# make test-all. CI still exports and runs a file end to end: the mode=export and
# predict.backend=onnxruntime commands of docs/guides/use-a-trained-model.md, whose segments must
# equal the PyTorch predict's (tests/test_segmenter.py), and the export form of adaptive pooling below.
TASKS = ["panoptic", "instance", "semantic"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Export:
    """``exported(task) -> (checkpoint, its ONNX file)``, each task written and exported once."""
    root = tmp_path_factory.mktemp("onnx")
    files: dict[str, tuple[Path, Path]] = {}

    def export(task: str) -> tuple[Path, Path]:
        if task not in files:
            (root / task).mkdir()
            ckpt, out = write_checkpoint(root / task, task), root / task / "out" / "model.onnx"
            assert export_onnx(ckpt, out) == out and out.is_file()
            files[task] = ckpt, out
        return files[task]

    return export


def _rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).abs().max() / ref.abs().max())


@pytest.mark.slow  # panoptic-swin: a 90 s export
@pytest.mark.parametrize("config", [*TASKS, "panoptic-swin"])
def test_onnxruntime_matches_pytorch_at_every_size_from_one_file(exported: Export, config: str) -> None:
    ckpt, onnx_path = exported(config)
    task = config.split("-")[0]
    eager = Segmenter.from_checkpoint(ckpt, precision="fp32").module.eval()
    network = OnnxRuntimeNetwork(onnx_path)
    assert network.stage == 1 == network.num_stages and network.task.name == task
    gen = torch.Generator().manual_seed(3)
    # Swin: stage-1 maps of 16..80 px, padded to its 7-px windows in every way (none at 56)
    for batch, h, w in SIZES + ([(1, 224, 320)] if config.endswith("swin") else []):
        images = torch.randn(batch, 3, h, w, generator=gen)
        with torch.inference_mode():
            ref = eager(images)[-1]
        got = network(images)
        kernels = network.num_proposals + (3 if task == "panoptic" else 0)  # panoptic: + one per stuff class
        assert got.mask_logits.shape == ref.mask_logits.shape == (batch, kernels, h // 4, w // 4)
        diffs = {"mask": _rel(ref.mask_logits, got.mask_logits)}
        if task == "semantic":
            assert ref.cls_logits is None and got.cls_logits is None
        else:
            assert got.cls_logits.shape == ref.cls_logits.shape
            diffs["cls"] = _rel(ref.cls_logits, got.cls_logits)
        print(f"{config} {batch}x{h}x{w}: max rel diff " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        assert max(diffs.values()) <= 2e-5, (config, batch, h, w, diffs)


@pytest.mark.slow  # a 60-90 s export, then refused
def test_a_swin_network_read_unpadded_is_refused_with_the_fixed_sizes_named(tmp_path: Path) -> None:
    """The semantic task reads images at their own size, so its graph cannot assume multiples of
    32, and with free sizes torch.export fixes the Swin windows' padding to the example's."""
    ckpt, out = write_checkpoint(tmp_path, "semantic-swin"), tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match=rf"{ckpt}: the exported semantic network fixes the input's "
                                           r"height=64, width=96 \(torch.export specialised them\).*nothing is written"):  # fmt: skip
        export_onnx(ckpt, out)
    assert not out.exists()


def _segments(result: SegmentationResult) -> list[tuple[int, np.ndarray]]:
    """(label, boolean mask) of every segment of a result, in its order."""
    if result.task == "instance":
        inst = result.instances
        return [(int(label), mask.numpy()) for label, mask in zip(inst["labels"], inst["masks"])]
    ids = (result.panoptic if result.task == "panoptic" else result.semantic).numpy()
    if result.task == "semantic":
        return [(s.label, ids == s.label) for s in result.segments]
    return [(s.label, ids == s.id) for s in result.segments]


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_segmenter_on_onnxruntime_gives_the_segments_of_pytorch(exported: Export, task: str) -> None:
    ckpt, onnx_path = exported(task)
    torch_seg = Segmenter.from_checkpoint(ckpt, precision="fp32")
    ort_seg = Segmenter.from_checkpoint(onnx_path, backend="onnxruntime")  # the file alone
    assert (ort_seg.backend, ort_seg.precision, ort_seg.task) == ("onnxruntime", "fp32", task)
    assert ort_seg.class_names == torch_seg.class_names and ort_seg.colors == torch_seg.colors
    assert ort_seg.settings == torch_seg.settings and ort_seg.dataset_ids == torch_seg.dataset_ids
    assert ort_seg.module.task.settings == torch_seg.module.task.settings
    rng = np.random.default_rng(0)
    # odd sizes: padded to 32 by the shared collate, cropped back by the shared post-processing
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((120, 150), (90, 70), (100, 128))]
    ref, got = torch_seg(images, batch_size=2), ort_seg(images, batch_size=2)
    total = 0
    for a, b in zip(ref, got):
        assert a.size == b.size
        sa, sb = _segments(a), _segments(b)
        assert [label for label, _ in sa] == [label for label, _ in sb]
        for (_, ma), (_, mb) in zip(sa, sb):
            union = (ma | mb).sum()
            iou = (ma & mb).sum() / union if union else 1.0
            assert iou >= 0.999, (task, iou)
        for x, y in zip(a.segments, b.segments):
            assert (x.label, x.class_name) == (y.label, y.class_name)
            assert (x.score is None and y.score is None) or abs(x.score - y.score) <= 1e-5
        total += len(sa)
    print(f"{task}: {total} segments compared")
    assert total >= 3  # the comparison is not of empty lists


@pytest.mark.slow
def test_bad_inputs_are_refused_with_the_file_named(exported: Export, tmp_path: Path) -> None:
    ckpt, onnx_path = exported("panoptic")
    stored = load_checkpoint_file(ckpt)
    del stored[MODEL_CONFIG_KEY]
    bare = tmp_path / "bare.ckpt"
    atomic_torch_save(stored, bare)
    with pytest.raises(ValueError, match=rf"{bare}: no '{MODEL_CONFIG_KEY}' entry"):
        export_onnx(bare, tmp_path / "bare.onnx")
    assert not (tmp_path / "bare.onnx").exists()
    with pytest.raises(ValueError, match="load it with backend='onnxruntime'"):
        Segmenter.from_checkpoint(onnx_path)
    with pytest.raises(ValueError, match="holds stage 1 of 0..1 only, got stage=0"):
        Segmenter.from_checkpoint(onnx_path, backend="onnxruntime", stage=0)
    with pytest.raises(ValueError, match="precision 'bf16' is for backend='torch'"):
        Segmenter.from_checkpoint(onnx_path, backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'onnxruntime'\)"):
        Segmenter.from_checkpoint(onnx_path, backend="tensorrt")
    with pytest.raises(ValueError, match=rf"{onnx_path}: images must be \(B, 3, H, W\) with H and W multiples of 32 "
                                         r".*got \(1, 3, 64, 48\)"):  # fmt: skip
        OnnxRuntimeNetwork(onnx_path)(torch.zeros(1, 3, 64, 48))


@pytest.mark.parametrize(
    ("task", "classes", "outputs"),
    [("panoptic", 7, [("mask_logits", ["batch", 9, "height_4", "width_4"]), ("cls_logits", ["batch", 9, 7])]),
     # instance mode on a panoptic data set: the network's classes are the four things
     ("instance", 4, [("mask_logits", ["batch", 6, "height_4", "width_4"]), ("cls_logits", ["batch", 6, 4])])],
)  # fmt: skip
@pytest.mark.slow
def test_the_file_alone_carries_what_post_processing_needs(
    exported: Export, task: str, classes: int, outputs: list[tuple[str, list]]
) -> None:
    import onnx

    ckpt, onnx_path = exported(task)
    model = onnx.load(str(onnx_path))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    stored = load_checkpoint_file(ckpt)
    assert meta[MODEL_CONFIG_KEY] == json.loads(json.dumps(stored[MODEL_CONFIG_KEY]))
    assert meta[INFERENCE_KEY]["dataset_ids"] == [1, 2, 3, 4, 101, 102, 103]
    names = ["circle", "square", "triangle", "star", "sky", "grass", "water"]
    assert meta["knet_classes"]["class_names"] == names[:classes]
    assert meta["knet_task"]["name"] == task and meta["knet_stage"] == 1
    if task == "instance":
        assert meta["knet_task"]["settings"]["max_per_img"] == 20
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(i.name, dims(i)) for i in model.graph.input] == [("images", ["batch", 3, "height", "width"])]
    assert [o.name for o in model.graph.output] == [name for name, _ in outputs]
    assert dims(model.graph.output[1]) == outputs[1][1]


@pytest.mark.slow
def test_a_checkpoint_runs_on_onnxruntime_through_a_temporary_export(
    exported: Export, monkeypatch: pytest.MonkeyPatch
) -> None:
    import knet_lightning.inference.onnx_export as onnx_export

    ckpt, onnx_path = exported("panoptic")
    calls = []

    def export(checkpoint: Path, out_path: Path, stage: int = -1, trusted: bool = False) -> Path:
        calls.append((Path(checkpoint), stage))  # the real export is the fixture's
        return Path(shutil.copy(onnx_path, out_path))

    monkeypatch.setattr(onnx_export, "export_onnx", export)
    seg = Segmenter.from_checkpoint(ckpt, backend="onnxruntime")
    assert calls == [(ckpt, -1)] and seg.backend == "onnxruntime" and seg.stage == 1
    assert not seg.module.path.exists()  # the temporary file is gone, the session stays
    image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    assert seg(image).panoptic.shape == (70, 90)


def test_the_export_form_of_adaptive_pooling_is_pytorchs() -> None:
    """PPM/ASPP pool as two averaging matmuls while exporting: PyTorch's bins at any size, also
    where the map is smaller than the output (a 64-pixel image's stride-32 map is 2x2)."""
    from knet_lightning.models.semantic_head import AdaptiveAvgPool2d, _pool_matrix

    for bins in (1, 2, 3, 6):
        for h, w in ((7, 5), (2, 2), (1, 3), (12, 9), (16, 24)):
            x = torch.randn(2, 3, h, w, dtype=torch.float64)
            ref = torch.nn.functional.adaptive_avg_pool2d(x, bins)
            got = _pool_matrix(h, bins, x) @ x @ _pool_matrix(w, bins, x).T
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
            assert torch.equal(AdaptiveAvgPool2d(bins)(x), ref)  # eager: PyTorch's own kernel
