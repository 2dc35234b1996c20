"""``mode=convert``: strict mapping, safe reading, class checks, and the converted checkpoint's uses
(``mode=eval ckpt_path=``, ``load_from=`` fine-tuning). MMSegmentation parity: test_convert_mmseg.py."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_utils import compose_cfg, run_cfg
from PIL import Image
from test_ade20k import _write_fixture as write_ade20k

from knet_lightning.checkpoint.convert import CONVERSION_KEY, ConversionError, convert_checkpoint
from knet_lightning.checkpoint.convert.mapping import convert_state_dict
from knet_lightning.checkpoint.convert.mmseg import MMSEG_SEMANTIC
from knet_lightning.checkpoint.convert.reading import read_published_checkpoint, sha256_of
from knet_lightning.checkpoint.io import load_checkpoint_file
from knet_lightning.cli import build_datamodule, build_model
from knet_lightning.data.ade20k import ADE20K_CLASSES
from knet_lightning.models.semantic_knet import SemanticKNet

UPERNET = "experiment=knet_upernet_r50_ade20k_80k"
# ResNetV1c-18 and a 32-wide head: the UPerNet experiment at toy size
TINY = ["model.num_stages=1", "model.net.pretrained=false", "model.net.backbone_depth=18", "model.net.channels=32",
        "model.net.updator_channels=32", "model.net.aux_channels=16", "model.net.feedforward_channels=64",
        "model.net.num_heads=2"]  # fmt: skip
LOADER = ["data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false"]


def _module(tmp_path: Path, *overrides: str):  # -> KNetModule
    cfg = compose_cfg(tmp_path, [UPERNET, *TINY, f"data.root={tmp_path / 'ade'}", *overrides])
    return build_model(cfg, build_datamodule(cfg).class_info)


def _published(net: torch.nn.Module, meta: dict[str, object]) -> dict[str, object]:
    """``net``'s weights under MMSegmentation's names, in an mmcv-style checkpoint."""
    inverse = MMSEG_SEMANTIC.inverse()
    state = {inverse.target_of(k): v.clone() for k, v in net.state_dict().items()}
    return {"meta": meta, "state_dict": state}


def test_mapping_is_strict_and_inverts() -> None:
    for head in ("fcn", "psp", "aspp", "uper"):
        net = SemanticKNet(num_classes=3, decode_head=head, deep_stem=True, backbone_depth=50 if head != "uper" else 18,
                           num_stages=2, channels=32, updator_channels=16, aux_channels=8, feedforward_channels=32,
                           num_heads=2)  # fmt: skip
        ours = net.state_dict()
        published = _published(net, {})["state_dict"]
        assert all(k.startswith(("backbone.", "decode_head.kernel_generate_head.", "decode_head.kernel_update_head.",
                                 "auxiliary_head.")) for k in published)  # fmt: skip
        back = convert_state_dict(published, ours, MMSEG_SEMANTIC, "src.pth")
        assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)

    missing = dict(published)
    del missing["decode_head.kernel_generate_head.conv_seg.weight"]
    with pytest.raises(
        ConversionError, match=r"src\.pth .*1 network tensors are not in the checkpoint: decode_head\.conv_seg\.weight"
    ):
        convert_state_dict(missing, ours, MMSEG_SEMANTIC, "src.pth")
    extra = {**published, "decode_head.kernel_generate_head.extra.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match=r"1 source tensors have no place .*kernel_generate_head\.extra\.weight"):
        convert_state_dict(extra, ours, MMSEG_SEMANTIC, "src.pth")
    wrong = {**published, "backbone.stem.0.weight": torch.zeros(16, 3, 3, 3)}
    with pytest.raises(
        ConversionError,
        match=r"shapes differ: backbone\.stem\.0\.weight \(16, 3, 3, 3\) -> backbone\.stem\.0\.weight \(32, 3, 3, 3\)",
    ):
        convert_state_dict(wrong, ours, MMSEG_SEMANTIC, "src.pth")


class _NotAllowed:
    """A class a weights-only load must refuse to build."""


def test_reading_refuses_what_is_not_a_published_checkpoint(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save({"meta": {"CLASSES": ("a", "b")}, "state_dict": {"w": torch.ones(2)}}, good)
    read = read_published_checkpoint(good)
    assert read.classes == ["a", "b"] and read.sha256 == sha256_of(good)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ConversionError, match=r"truncated\.pth is not a readable torch checkpoint"):
        read_published_checkpoint(truncated)
    not_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(ConversionError, match=r"list\.pth: 'state_dict' must map parameter names to tensors, got list"):
        read_published_checkpoint(not_state)
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {"x": _NotAllowed()}}, evil, pickle_module=pickle)
    with pytest.raises(ConversionError, match=r"evil\.pth needs Python objects .*refuses: test_convert\._NotAllowed"):
        read_published_checkpoint(evil)
    with pytest.raises(ConversionError, match=r"missing\.pth does not exist"):
        read_published_checkpoint(tmp_path / "missing.pth")


def test_convert_refuses_another_model_or_other_classes_and_writes_nothing(tmp_path: Path) -> None:
    module = _module(tmp_path, "model.net.backbone_depth=50")
    out = tmp_path / "out.ckpt"
    # the FCN (D8) checkpoint into the UPerNet experiment: named by the modules it lacks and has
    fcn = SemanticKNet(num_classes=150, decode_head="fcn", deep_stem=True, backbone_depth=50, num_stages=1,
                       channels=32, updator_channels=32, aux_channels=16, feedforward_channels=64, num_heads=2)  # fmt: skip
    torch.save(_published(fcn, {"dataset_meta": {"classes": list(ADE20K_CLASSES)}}), tmp_path / "fcn.pth")
    with pytest.raises(
        ConversionError,
        match=r"fcn\.pth does not match this network .*no place in the network: "
        r"decode_head\.kernel_generate_head\.convs\.\* \(12\), decode_head\.kernel_generate_head\.conv_cat\.\* \(6\); "
        r"\d+ network tensors are not in the checkpoint: decode_head\.psp_modules\.\* \(24\)",
    ):
        convert_checkpoint(tmp_path / "fcn.pth", out, module, ADE20K_CLASSES)
    # right layout, other classes
    names = list(ADE20K_CLASSES)
    names[3] = "carpet"
    torch.save(_published(module.net, {"dataset_meta": {"classes": names}}), tmp_path / "classes.pth")
    with pytest.raises(ConversionError, match=r"classes\.pth was trained on other classes .*3: 'carpet' vs 'floor'"):
        convert_checkpoint(tmp_path / "classes.pth", out, module, ADE20K_CLASSES)
    assert not out.exists() and not list(tmp_path.glob(".out.ckpt*"))


def test_converted_checkpoint_evaluates_and_fine_tunes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """mode=convert, then mode=eval / mode=predict with ckpt_path= and a training run with load_from=, on
    the ADE20K fixture."""
    write_ade20k(tmp_path / "ade")
    data = [f"data.root={tmp_path / 'ade'}", *LOADER, "data.img_scale=[64,32]", "data.crop_size=32"]
    source_net = _module(tmp_path).net
    with torch.no_grad():
        for p in source_net.parameters():
            p.normal_(0, 0.05)
    source = tmp_path / "knet_upernet_ade20k.pth"
    # MMSegmentation 0.x / mmcv 1.x layout: meta.CLASSES (with MMSegmentation's 'bed ')
    classes = [c if c != "bed" else "bed " for c in ADE20K_CLASSES]
    torch.save(_published(source_net, {"mmseg_version": "0.21.0", "CLASSES": tuple(classes)}), source)
    converted = tmp_path / "converted.ckpt"
    run_cfg(compose_cfg(tmp_path / "convert", ["mode=convert", UPERNET, *TINY, *data, f"convert_source={source}",
                                                f"convert_output={converted}"]))  # fmt: skip
    stored = load_checkpoint_file(converted)
    record = stored[CONVERSION_KEY]
    assert record["source_sha256"] == sha256_of(source) and record["source_version"] == {"mmseg_version": "0.21.0"}
    for key, value in source_net.state_dict().items():
        assert torch.equal(stored["state_dict"][f"net.{key}"], value)

    # evaluation rebuilds the network from the converted checkpoint: no model overrides needed
    run_cfg(compose_cfg(tmp_path / "eval", [UPERNET, *data, f"ckpt_path={converted}", "export_predictions=true"],
                        config_name="eval"))  # fmt: skip
    evaluated = json.loads((tmp_path / "eval" / "run" / "metrics.json").read_text())
    assert 0.0 <= evaluated["test/miou"] <= 100.0
    (png,) = sorted((tmp_path / "eval" / "run" / "predictions" / "semantic").glob("*.png"))
    label = np.array(Image.open(png))
    # original size, ADE20K's own ids 1..150 (0 = other), as the official evaluation reads them
    assert png.name == "ADE_val_00000001.png" and label.shape == (20, 16) and 1 <= label.min() <= label.max() <= 150

    # predict on a folder of images with the converted checkpoint
    run_cfg(compose_cfg(tmp_path / "predict", ["mode=predict", UPERNET, *data, f"ckpt_path={converted}",
                                                f"inputs={tmp_path / 'ade' / 'ADEChallengeData2016' / 'images' / 'validation'}"]))  # fmt: skip
    (predicted,) = sorted((tmp_path / "predict" / "run" / "predictions" / "semantic").glob("*.png"))
    assert predicted.name == "ADE_val_00000001.png" and np.array(Image.open(predicted)).shape == (20, 16)

    # fine-tuning: the converted weights, a fresh optimizer and schedule, then the usual train-then-test
    two_steps = ["debug=limit", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.max_epochs=2",
                 "trainer.limit_train_batches=1", "data.batch_size=2"]  # fmt: skip
    with caplog.at_level("INFO", logger="knet_lightning.checkpoint.model"):
        run_cfg(compose_cfg(tmp_path / "tune", [UPERNET, *TINY, *data, *two_steps, f"load_from={converted}"]))
    assert f"load_from={converted}: network weights loaded" in caplog.text
    run_dir = tmp_path / "tune" / "run"
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert {"val/miou", "val/acc", "val/miou_s0", "val/miou_s1", "test/miou"} <= set(trained)
    last = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and len(last["optimizer_states"]) == 1

    wide = [UPERNET, *TINY, *data, *two_steps, "model.net.aux_channels=8", f"load_from={converted}"]
    with pytest.raises(ConversionError, match=r"load_from=.*converted\.ckpt does not match this network.*shapes "
                                              r"differ.*; with load_from_strict=false"):  # fmt: skip
        run_cfg(compose_cfg(tmp_path / "wide", wide))
    # not strict: what matches is loaded, the auxiliary head of another width keeps its init
    with caplog.at_level("INFO", logger="knet_lightning.checkpoint.model"):
        run_cfg(compose_cfg(tmp_path / "wide", [*wide, "load_from_strict=false"]))
    assert re.search(r"load_from=.*converted\.ckpt \(not strict\): \d+ of \d+ network tensors loaded.*left as "
                     r"initialised: \d+ of another shape: .*aux", caplog.text), caplog.text  # fmt: skip
    with pytest.raises(ValueError, match="either load_from= .* or ckpt_path="):
        run_cfg(compose_cfg(tmp_path / "both", [UPERNET, *TINY, *data, f"load_from={converted}",
                                                 f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]))  # fmt: skip


def test_load_from_not_strict_loads_what_matches_and_names_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """load_from_strict=false, as for fine-tuning on other classes: tensors of equal name and shape
    come from the checkpoint, the classifier of another class count keeps its initialisation."""
    from types import SimpleNamespace

    from torch import nn

    from knet_lightning.checkpoint.model import load_network_weights

    def net(classes: int) -> nn.Module:
        torch.manual_seed(classes)
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(4, classes))

    source = net(133)
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}, "epoch": 3},
               tmp_path / "coco.ckpt")  # fmt: skip
    module = SimpleNamespace(net=net(19))
    initial = {k: v.clone() for k, v in module.net.state_dict().items()}
    with pytest.raises(ConversionError, match=r"shapes differ: 1\.weight \(133, 4\) -> 1\.weight \(19, 4\).*"
                                              r"; with load_from_strict=false"):  # fmt: skip
        load_network_weights(module, str(tmp_path / "coco.ckpt"))
    assert all(torch.equal(v, initial[k]) for k, v in module.net.state_dict().items())  # nothing half-loaded

    with caplog.at_level("INFO", logger="knet_lightning.checkpoint.model"):
        load_network_weights(module, str(tmp_path / "coco.ckpt"), strict=False)
    loaded = module.net.state_dict()
    assert torch.equal(loaded["0.weight"], source[0].weight) and torch.equal(loaded["0.bias"], source[0].bias)
    assert torch.equal(loaded["1.weight"], initial["1.weight"]) and torch.equal(loaded["1.bias"], initial["1.bias"])
    (record,) = [r for r in caplog.records if "not strict" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert "2 of 4 network tensors loaded" in record.getMessage()
    assert (
        "left as initialised: 2 of another shape: 1.weight (133, 4) -> (19, 4), 1.bias (133,) -> (19,)"
        in record.getMessage()
    )

    torch.save({"state_dict": {"net.head.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(ConversionError, match=r"other\.ckpt: no tensor of its network has a name and shape"):
        load_network_weights(module, str(tmp_path / "other.ckpt"), strict=False)


def test_coco_panoptic_weights_fine_tune_on_cityscapes_panoptic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cross-data-set fine-tuning of docs/guides/published-weights.md: COCO panoptic weights
    (133 classes) into the Cityscapes panoptic experiment (19) with load_from_strict=false. Only the
    classifiers differ."""
    from cli_utils import TINY_MODEL
    from test_cityscapes import _write_fixture as write_cityscapes
    from test_readme import _write_coco_panoptic

    _write_coco_panoptic(tmp_path / "coco")
    write_cityscapes(tmp_path / "cityscapes")
    one_step = [*LOADER, *TINY_MODEL, "model.net.pretrained=false", "trainer.max_steps=1", "trainer.max_epochs=1",
                "trainer.limit_train_batches=1", "trainer.limit_val_batches=0", "test_after_fit=false"]  # fmt: skip
    run_cfg(compose_cfg(tmp_path / "coco_run", ["experiment=knet_r50_coco_panoptic_1x", f"data.root={tmp_path / 'coco'}",
                                                 "data.train_short_edge=64", "data.train_max_size=96", *one_step]))  # fmt: skip
    coco = load_checkpoint_file(tmp_path / "coco_run" / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    with caplog.at_level("INFO", logger="knet_lightning.checkpoint.model"):
        run_cfg(compose_cfg(tmp_path / "cs_run", [
            "experiment=knet_r50_cityscapes_panoptic_90k", f"data.root={tmp_path / 'cityscapes'}", "data.crop_size=[16,32]",
            "data.batch_size=2", *one_step, f"load_from={tmp_path / 'coco_run' / 'run' / 'checkpoints' / 'last.ckpt'}",
            "load_from_strict=false"]))  # fmt: skip
    (message,) = [r.getMessage() for r in caplog.records if "(not strict)" in r.getMessage()]
    left = re.search(r"left as initialised: 4 of another shape: (.*)$", message)
    assert left, message
    assert sorted(re.findall(r"([\w.]+) \(", left.group(1))) == [
        "kernel_head.conv_seg.bias", "kernel_head.conv_seg.weight", "update_heads.0.fc_cls.bias",
        "update_heads.0.fc_cls.weight"]  # fmt: skip
    assert f"{len(coco) - 4} of {len(coco)} network tensors loaded" in message
