"""The MMSegmentation 1.x K-Net reference peer (tests/mmseg_peer.py) builds, runs and saves."""

from __future__ import annotations

import collections
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mmseg_peer as peer
import pytest
import torch
import torch.nn.functional as F

NUM_CLASSES = 5
NUM_STAGES = 3
# decode feature stride: the R50-D8 models keep 1/8, UPerNet fuses at 1/4
STRIDE = {"fcn": 8, "pspnet": 8, "deeplabv3": 8, "upernet": 4}
# the harness is checked on the four R50 configs; the Swin ones go through it in test_convert_mmseg.py
R50_CONFIGS = list(STRIDE)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """The four peers, num_classes=5, randomized (seed 0), built once for the module."""
    return {
        name: peer.randomize_(peer.build_mmseg_knet(name, NUM_CLASSES, init="empty"), seed=0) for name in R50_CONFIGS
    }


def _images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_import_is_idempotent_and_configs_are_installed() -> None:
    mmseg = peer.import_mmseg()
    assert peer.import_mmseg() is mmseg
    assert mmseg.__version__ == "1.2.2"
    assert sorted(peer.KNET_CONFIGS) == ["deeplabv3", "fcn", "pspnet", "swin-l", "swin-t", "upernet"]
    for name in peer.KNET_CONFIGS:
        assert peer.config_path(name).is_file()
    with pytest.raises(NotImplementedError, match="mmcv-lite"):
        import mmcv._ext  # the stand-in

        mmcv._ext.nms_forward()


def test_missing_peer_says_make_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mmseg", None)  # `import mmseg` now fails
    with pytest.raises(ImportError, match="make install"):
        peer.import_mmseg()


def test_config_adaptations() -> None:
    cfg = peer.load_knet_config("upernet", num_classes=7)
    text = cfg.pretty_text
    assert "SyncBN" not in text and "data_preprocessor" not in cfg.model and cfg.model.pretrained is None
    heads = [
        cfg.model.decode_head.kernel_generate_head,
        cfg.model.auxiliary_head,
        *cfg.model.decode_head.kernel_update_head,
    ]
    assert [head.num_classes for head in heads] == [7] * 5


@pytest.mark.parametrize("name", R50_CONFIGS)
def test_stage_logits_match_mmseg_forward(models: dict, name: str) -> None:
    model = models[name]
    assert not model.training
    images = _images(1, 72, 88)
    stages = peer.mmseg_stage_logits(model, images)
    h, w = 72 // STRIDE[name], 88 // STRIDE[name]
    assert len(stages) == NUM_STAGES + 1
    assert [tuple(s.shape) for s in stages] == [(1, NUM_CLASSES, h, w)] * (NUM_STAGES + 1)
    for logits in stages:  # randomize_ keeps every stage O(1-30)
        assert torch.isfinite(logits).all()
        assert 0.2 < logits.abs().max() < 30
    with torch.no_grad():
        feats = model.extract_feat(images)
        # stage 0 is the kernel generate head's own output (conv_seg on its features)
        torch.testing.assert_close(stages[0], model.decode_head.kernel_generate_head(feats), rtol=0, atol=0)
        # the last stage is mmseg's eval-mode forward (before resize)
        torch.testing.assert_close(stages[-1], model._forward(images), rtol=0, atol=0)


def test_predict_resizes_the_last_stage(models: dict) -> None:
    model = models["upernet"]
    images = _images(1, 72, 88)
    last = peer.mmseg_stage_logits(model, images)[-1]
    with torch.no_grad():
        predicted = model.predict(images)[0].seg_logits.data
    # predict() = the last stage resized to the input size (bilinear, align_corners=False)
    resized = F.interpolate(last, size=(72, 88), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(predicted, resized, rtol=0, atol=0)


def test_randomize_is_deterministic_and_covers_everything(models: dict) -> None:
    model = peer.build_mmseg_knet("fcn", NUM_CLASSES, init="empty")
    for value in model.state_dict().values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    randomized = peer.randomize_(model, seed=0).state_dict()
    for key, value in models["fcn"].state_dict().items():  # also randomized with seed 0
        assert torch.equal(value, randomized[key]), key  # so no NaN is left either
    mean = randomized["backbone.stem.1.running_mean"]
    var = randomized["backbone.stem.1.running_var"]
    assert 0.02 < mean.std() < 0.3 and 0.5 <= var.min() and var.max() <= 2.0
    bn = randomized["backbone.layer1.0.bn3.weight"]
    assert 0.5 <= bn.min() and bn.max() <= 1.5 and bn.std() > 0.2


def test_losses_are_mmseg_cross_entropy(models: dict) -> None:
    model = models["upernet"]
    images = _images(2, 64, 64, seed=2)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=torch.Generator().manual_seed(3))
    labels[:, :8] = peer.IGNORE_INDEX
    losses = peer.mmseg_losses(model, images, labels)
    names = [f"decode.{kind}.s{i}" for i in range(NUM_STAGES + 1) for kind in ("loss_ce", "acc_seg")]
    assert list(losses) == names + ["aux.loss_ce", "aux.acc_seg"]
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert not model.training

    # the documented recipe: bilinear resize to the labels (align_corners=False), CE with
    # ignore_index 255 summed over pixels and divided by ALL pixels (avg_non_ignore=False)
    def ce(logits: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(up, labels, ignore_index=peer.IGNORE_INDEX, reduction="sum") / labels.numel()

    stages = peer.mmseg_stage_logits(model, images)
    for i, logits in enumerate(stages):
        torch.testing.assert_close(losses[f"decode.loss_ce.s{i}"], ce(logits), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        aux_logits = model.auxiliary_head(model.extract_feat(images))
    torch.testing.assert_close(losses["aux.loss_ce"], 0.4 * ce(aux_logits), rtol=1e-5, atol=1e-6)

    # train mode (BN batch statistics, dropout) updates the BN running statistics: restore them
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    torch.manual_seed(0)
    train_losses = peer.mmseg_losses(model, images[..., :32, :32], labels[..., :32, :32], train=True)
    assert not model.training  # mode restored
    changed = [key for key, value in model.state_dict().items() if not torch.equal(value, saved[key])]
    assert changed and all(key.endswith(("running_mean", "running_var", "num_batches_tracked")) for key in changed)
    model.load_state_dict(saved)
    assert list(train_losses) == list(losses)
    assert all(torch.isfinite(v).all() for v in train_losses.values())


@pytest.fixture
def ram_dir(tmp_path: Path) -> Iterator[Path]:
    """A scratch folder in /dev/shm where there is one (the checkpoint is ~750 MB), else tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="mmseg_peer_", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_checkpoint_matches_runner_layout_and_reloads(models: dict, ram_dir: Path) -> None:
    model = models["pspnet"]  # the smallest of the four (62 M parameters)
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    path = ram_dir / "iter_1.pth"
    peer.save_mmseg_checkpoint(model, path, classes, iters=1)

    # torch's weights_only default refuses it, as it refuses a real mmengine checkpoint ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) <= set(peer.WEIGHTS_ONLY_UNSAFE_GLOBALS)
    # ... mmengine's load_checkpoint loads it with the documented allowlist (into a fresh model)
    fresh = peer.build_mmseg_knet("pspnet", NUM_CLASSES, init="empty")
    ckpt = peer.load_mmseg_checkpoint(fresh, path)
    images = _images(1, 64, 64, seed=4)
    for a, b in zip(peer.mmseg_stage_logits(fresh, images), peer.mmseg_stage_logits(model, images)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # the layout of a checkpoint written by a real Runner + CheckpointHook (2 iterations)
    assert list(ckpt) == ["meta", "state_dict", "message_hub", "optimizer", "param_schedulers"]
    meta = ckpt["meta"]
    assert list(meta) == ["epoch", "iter", "cfg", "seed", "experiment_name", "time", "mmengine_version", "dataset_meta"]
    assert (meta["epoch"], meta["iter"]) == (0, 1)
    assert meta["dataset_meta"]["classes"] == tuple(classes)
    assert list(meta["dataset_meta"]) == ["classes", "palette", "label_map", "reduce_zero_label"]
    assert all(isinstance(rgb, list) and len(rgb) == 3 for rgb in meta["dataset_meta"]["palette"])
    assert meta["mmengine_version"].startswith("0.10.7")
    hub = ckpt["message_hub"]
    assert list(hub) == ["log_scalars", "runtime_info", "resumed_keys"]
    losses = [f"train/decode.{kind}.s{i}" for i in range(NUM_STAGES + 1) for kind in ("loss_ce", "acc_seg")]
    assert list(hub["log_scalars"]) == [
        "train/lr", "train/data_time", "train/grad_norm", "train/loss", *losses,
        "train/aux.loss_ce", "train/aux.acc_seg", "train/time",
    ]  # fmt: skip
    assert type(hub["log_scalars"]["train/lr"]).__name__ == "HistoryBuffer"
    assert list(hub["runtime_info"]) == [
        "cfg", "seed", "experiment_name", "mmengine_version", "loop_stage", "epoch", "iter",
        "max_epochs", "max_iters", "dataset_meta", "eta", "last_ckpt",
    ]  # fmt: skip
    assert type(hub["runtime_info"]["eta"]).__name__ == "float64"
    assert set(ckpt["optimizer"]) == {"state", "param_groups"}
    n_params = sum(1 for _ in model.parameters())
    assert len(ckpt["optimizer"]["state"]) == n_params
    assert set(ckpt["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert [type(s.get("milestones")) for s in ckpt["param_schedulers"]] == [type(None), collections.Counter]
    assert ckpt["state_dict"].keys() == model.state_dict().keys()
