"""Parity with MMSegmentation 1.x's K-Net: its checkpoints convert and our network gives its outputs.

For each of MMSegmentation's four ADE20K K-Net configs (FCN, PSPNet, DeepLabV3, UPerNet on
ResNetV1c-50), the peer is built from its own config file with random weights and non-trivial
BN statistics (tests/mmseg_peer.py), saved as MMSegmentation's Runner saves it, converted by
``mode=convert``'s function for our experiment, and loaded strictly; then every stage's
logits (two input sizes, one not a multiple of 32) and the training losses must agree.
"""

from __future__ import annotations

from pathlib import Path

import mmseg_peer as peer
import pytest
import torch
from cli_utils import compose_cfg
from omegaconf import open_dict
from torchvision.ops import StochasticDepth

from knet_lightning.checkpoint.convert import CONVERSION_KEY, convert_checkpoint
from knet_lightning.checkpoint.convert.reading import sha256_of
from knet_lightning.checkpoint.io import load_checkpoint_file
from knet_lightning.cli import build_datamodule, build_model
from knet_lightning.data.ade20k import ADE20K_CLASSES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# MMSegmentation's config -> (our experiment, its overrides); MMSegmentation 1.x's UPerNet head is 512 wide
EXPERIMENTS = {
    "fcn": ("knet_fcn_r50_ade20k_80k", []),
    "pspnet": ("knet_pspnet_r50_ade20k_80k", []),
    "deeplabv3": ("knet_deeplabv3_r50_ade20k_80k", []),
    "upernet": ("knet_upernet_r50_ade20k_80k", ["model.net.channels=512"]),
    "swin-t": ("knet_upernet_swin-t_ade20k_80k_mmseg", []),
    "swin-l": ("knet_upernet_swin-l_ade20k_80k_mmseg", []),
}
# the bounds: logits to 2e-5 x max |logit| in fp32, losses to a relative 1e-5
LOGIT_TOL = 2e-5
LOSS_TOL = 1e-5


def _ours(tmp_path: Path, name: str, ckpt: Path | None = None) -> torch.nn.Module:
    experiment, extra = EXPERIMENTS[name]
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", "model.net.pretrained=false", *extra])
    with open_dict(cfg):
        cfg.data.root = str(tmp_path / "no_ade20k")  # the ADE20K classes are known without the files
    datamodule = build_datamodule(cfg)
    return build_model(cfg, datamodule.class_info, ckpt)


# Swin-L (its 989 MB checkpoint written and converted, both networks built at full size: ~30 s and
# 2 GB of disk) in make test-all; Swin-T runs the same mapping and layers in CI
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "swin-l" else n
                                  for n in sorted(EXPERIMENTS)])  # fmt: skip
def test_mmsegmentation_checkpoint_converts_and_matches_logits_and_losses(tmp_path: Path, name: str) -> None:
    ref = peer.randomize_(peer.build_mmseg_knet(name, init="empty"), seed=3).eval()
    source = tmp_path / f"{name}.pth"
    # the full Runner layout (optimizer, schedulers, message_hub) once; the others without
    # optimizer and scheduler state (3x smaller, and building them takes most of the time)
    full = name == "fcn"
    peer.save_mmseg_checkpoint(ref, source, peer_classes(), save_optimizer=full, save_param_scheduler=full)

    module = _ours(tmp_path, name)
    output = tmp_path / "converted.ckpt"
    record = convert_checkpoint(source, output, module, ADE20K_CLASSES)
    assert record["source_sha256"] == sha256_of(source) and "MMSegmentation" in record["mapping"]

    # the same tensors and parameters as MMSegmentation's model (e.g. FCN 62.8 M, 475 tensors), but
    # for Swin's relative_position_index buffers, a function of the window size that we do not save
    assert len(module.net.state_dict()) == len(
        [k for k in ref.state_dict() if not k.endswith("relative_position_index")]
    )
    assert sum(p.numel() for p in module.net.parameters()) == sum(p.numel() for p in ref.parameters())
    stored = load_checkpoint_file(output)
    assert stored[CONVERSION_KEY] == record
    net = module.net
    net.load_state_dict({k.removeprefix("net."): v for k, v in stored["state_dict"].items()}, strict=True)
    net.eval()

    for size in [(64, 64), (72, 88)]:
        images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            expected = peer.mmseg_stage_logits(ref, images)
            got = [out.mask_logits for out in net(images)]
        assert len(got) == len(expected) == 4
        for stage, (a, b) in enumerate(zip(got, expected)):
            assert a.shape == b.shape, (stage, size)
            scale = b.abs().max().item()
            diff = (a - b).abs().max().item()
            print(f"{name} {size} stage {stage}: max |diff| {diff:.1e}, / max |logit| {diff / scale:.2e}")
            assert (a - b).abs().max().item() <= LOGIT_TOL * scale, (stage, size, scale)

    # training losses on one batch: mmseg's decode-head CE per stage and the 0.4 auxiliary CE;
    # BN, dropout and Swin's stochastic depth in eval mode on both sides so that the two forward passes are the same
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, 150, (2, 64, 64), generator=torch.Generator().manual_seed(8))
    labels[:, :5] = 255
    expected_losses = peer.mmseg_losses(ref, images, labels)
    net.train()
    for m in net.modules():
        if isinstance(
            m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout, torch.nn.Dropout2d, StochasticDepth)
        ):
            m.eval()
    with torch.no_grad():
        losses = module.criterion(net(images), [{"sem_seg": lab} for lab in labels], pad_size=(64, 64))
    pairs = {f"s{i}.ce": f"decode.loss_ce.s{i}" for i in range(4)} | {"aux.ce": "aux.loss_ce"}
    assert set(losses) == set(pairs)
    for ours_key, theirs in pairs.items():
        a, b = losses[ours_key].item(), expected_losses[theirs].item()
        print(f"{name} loss {ours_key}: relative diff {abs(a - b) / abs(b):.1e}")
        assert abs(a - b) <= LOSS_TOL * abs(b), (ours_key, a, b)


def peer_classes() -> list[str]:
    """MMSegmentation's ADE20K class names (its 'bed ' with a trailing space included)."""
    peer.import_mmseg()
    from mmseg.datasets import ADE20KDataset

    return list(ADE20KDataset.METAINFO["classes"])


def _rule(t: torch.Tensor) -> tuple[str, float]:
    """What an initialisation left in ``t``: a constant, or a spread (its standard deviation)."""
    if torch.all(t == t.flatten()[0]):
        return f"constant {float(t.flatten()[0])}", 0.0
    return "random", float(t.float().std())


def test_kernel_update_heads_start_as_mmsegmentations_do(tmp_path: Path) -> None:
    """The official semantic heads' Xavier ``init_weights`` is never called (they sit in a plain
    ``nn.ModuleList``): after MMSegmentation's own ``init_weights`` they hold PyTorch's default
    init, and a ConvModule's Kaiming init in ``feat_transform``. Ours start from the same rules:
    the same constants, and the same spread (std within 10%) for every random tensor."""
    from knet_lightning.checkpoint.convert.mmseg import MMSEG_SEMANTIC

    ref = peer.build_mmseg_knet("fcn", init="mmseg")
    theirs = {k: v for k, v in ref.state_dict().items() if ".kernel_update_head." in k}
    ours = dict(_ours(tmp_path, "fcn").net.state_dict())
    compared = 0
    for key, value in theirs.items():
        mine = ours[MMSEG_SEMANTIC.target_of(key)]
        (kind_a, std_a), (kind_b, std_b) = _rule(mine), _rule(value)
        assert kind_a == kind_b, f"{key}: ours {kind_a}, MMSegmentation's {kind_b}"
        if kind_a == "random" and value.numel() >= 4096:
            assert std_a == pytest.approx(std_b, rel=0.1), key
            compared += 1
    assert compared >= 3 * 8  # per stage: feat_transform, attention in/out, updator, FFN, mask fcs
