"""The official K-Net release's detection checkpoints (MMDetection 2.x) convert strictly and back.

No MMDetection 2.x runs here, so the official key names and shapes come from the official code:
tests/data/knet_official/*.txt list the ``state_dict()`` of the models built from the official
configs (their headers say how). A checkpoint in that layout with random values is converted,
loaded strictly, and mapped back to the identical official dict.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import mmseg_peer as peer
import pytest
import torch
from cli_utils import compose_cfg
from hydra.utils import instantiate

from knet_lightning.checkpoint.convert import CONVERSION_KEY, ConversionError, convert_checkpoint
from knet_lightning.checkpoint.convert.backbones import backbone_from_published, backbone_to_published
from knet_lightning.checkpoint.convert.mapping import convert_state_dict
from knet_lightning.checkpoint.convert.mmdet import MMDET_KNET
from knet_lightning.checkpoint.io import load_checkpoint_file
from knet_lightning.cli import build_model
from knet_lightning.data.meta import ClassInfo
from knet_lightning.models.knet import KNet

OFFICIAL = Path(__file__).parent / "data" / "knet_official"
BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "relative_position_index")
# model -> (our experiment, official parameters, official state_dict tensors)
MODELS = {
    "panoptic_r50": ("knet_r50_coco_panoptic_1x", 37_536_852, 502),
    "instance_r50": ("knet_r50_coco_instance_1x", 37_482_368, 502),
    "panoptic_r101": ("knet_r101_coco_panoptic_ms3x", 56_528_980, 808),
    "panoptic_r101_dcn": ("knet_r101_dcn_coco_panoptic_ms3x", 57_815_152, 868),
    "panoptic_swin_l": ("knet_swin-l_coco_panoptic_ms3x", 208_781_224, 541),
}


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    lines = (OFFICIAL / f"{name}.txt").read_text().splitlines()
    pairs = [line.split(" ", 1) for line in lines if line and not line.startswith("#")]
    return {key: tuple(ast.literal_eval(shape)) for key, shape in pairs}


def random_official(keys: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values of a trained network's kind: fan-in scaled weights, norm scales near 1,
    positive BN variances (so that the network runs finite, as a published one does)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.randint(0, 1000, shape, generator=gen)
        elif key.endswith("relative_position_index"):  # Swin's constant index buffer
            out[key] = peer.relative_position_index(math.isqrt(shape[0]))
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):  # BN / GN / LN scale
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:  # biases, running means
            out[key] = 0.1 * torch.randn(shape, generator=gen)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_official_layout_converts_strictly_and_round_trips(tmp_path: Path, name: str) -> None:
    experiment, params, tensors = MODELS[name]
    keys = official_keys(name)
    # the counts derived from the official code, and ours (without Swin's index buffers, a
    # function of the window size that we do not save)
    assert len(keys) == tensors
    assert sum(math.prod(s) for k, s in keys.items() if not k.endswith(BUFFERS)) == params
    # the network of the experiment that reproduces the official model, with COCO's class counts
    # (a run takes them from the data set's JSON)
    stuff = 53 if "panoptic" in experiment else 0
    counts = ["data.num_things=80", f"data.num_stuff={stuff}", f"data.num_classes={80 + stuff}"]
    net = instantiate(
        compose_cfg(tmp_path, [f"experiment={experiment}", "model.net.pretrained=false", *counts]).model.net
    )
    assert isinstance(net, KNet)
    saved = {k for k in keys if not k.endswith("relative_position_index")}
    assert sum(p.numel() for p in net.parameters()) == params and len(net.state_dict()) == len(saved)

    official = random_official(keys)
    source = backbone_from_published(official, net.backbone)
    net.load_state_dict(convert_state_dict(source, net.state_dict(), MMDET_KNET, f"{name}.pth"), strict=True)
    back = backbone_to_published(
        convert_state_dict(net.state_dict(), source, MMDET_KNET.inverse(), "ours"), net.backbone
    )
    assert back.keys() == saved and all(torch.equal(back[k], official[k]) for k in saved)

    unused = {**official, "roi_head.mask_head.3.fc_cls.weight": torch.zeros(3)}
    with pytest.raises(
        ConversionError, match=r"1 source tensors have no place in the network: roi_head\.mask_head\.3\.fc_cls\.weight"
    ):
        convert_state_dict(backbone_from_published(unused, net.backbone), net.state_dict(), MMDET_KNET, f"{name}.pth")


def _coco_class_info(names: list[str], num_things: int) -> ClassInfo:
    n = len(names)
    return ClassInfo(names=tuple(names), isthing=tuple(i < num_things for i in range(n)),
                     colors=tuple((i, i, i) for i in range(n)), dataset_ids=tuple(range(1, n + 1)))  # fmt: skip


def test_panoptic_checkpoint_converts_and_instance_weights_are_refused(tmp_path: Path) -> None:
    names = [f"thing{i}" for i in range(80)] + [f"stuff{i}" for i in range(53)]
    cfg = compose_cfg(tmp_path, ["experiment=knet_r50_coco_panoptic_1x", "model.net.pretrained=false"])
    module = build_model(cfg, _coco_class_info(names, 80))
    # mmcv 1.x save_checkpoint's layout; the release script drops the optimizer
    source = tmp_path / "knet_s3_r50_fpn_1x_coco-panoptic.pth"
    published = [f" {n}" if i == 7 else n for i, n in enumerate(names)]  # as mmdet 2.17's ' truck': spaces ignored
    official = random_official(official_keys("panoptic_r50"), seed=1)
    meta = {"mmdet_version": "2.17.0", "mmcv_version": "1.3.14", "CLASSES": published, "epoch": 12, "iter": 88000}
    torch.save({"meta": meta, "state_dict": official}, source)
    out = tmp_path / "panoptic.ckpt"
    record = convert_checkpoint(source, out, module, names)
    assert record["source_version"] == {"mmdet_version": "2.17.0", "mmcv_version": "1.3.14"}
    stored = load_checkpoint_file(out)
    assert stored[CONVERSION_KEY]["mapping"] == MMDET_KNET.name
    assert torch.equal(stored["state_dict"]["net.kernel_head.conv_seg.weight"], official["rpn_head.conv_seg.weight"])
    assert torch.equal(
        stored["state_dict"]["net.fpn.lateral_convs.0.weight"], official["neck.lateral_convs.0.conv.weight"]
    )

    # instance weights into the panoptic experiment: its 80 classes, or without a class list its shapes
    instance = random_official(official_keys("instance_r50"))
    torch.save({"meta": {"CLASSES": tuple(names[:80])}, "state_dict": instance}, tmp_path / "instance.pth")
    with pytest.raises(
        ConversionError, match=r"instance\.pth was trained on other classes .*80 classes in the checkpoint, 133"
    ):
        convert_checkpoint(tmp_path / "instance.pth", tmp_path / "bad.ckpt", module, names)
    torch.save({"state_dict": instance}, tmp_path / "bare.pth")
    with pytest.raises(
        ConversionError,
        match=r"bare\.pth does not match .*shapes differ: rpn_head\.conv_seg\.weight \(80, 256, 1, 1\) -> kernel_head\.conv_seg\.weight \(133, 256, 1, 1\)",
    ):
        convert_checkpoint(tmp_path / "bare.pth", tmp_path / "bad.ckpt", module, names)
    assert not (tmp_path / "bad.ckpt").exists()
