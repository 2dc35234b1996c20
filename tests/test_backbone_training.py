"""The paper's large-model backbones train inside K-Net: a Swin-T and a narrow ResNet-50 with
deformable convs in c3-c5 each run a few training steps on the synthetic data set, the loss
falls, and every trainable parameter (Swin's bias tables and output norms, the DCN offset convs)
gets a gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knet_lightning.criterion import HungarianMatcher, KNetCriterion
from knet_lightning.data.coco import COCOPanopticDataset
from knet_lightning.data.synthetic import generate_synthetic_panoptic
from knet_lightning.data.transforms import build_transforms, collate_batch
from knet_lightning.models.dcn import DeformConv2dPack
from knet_lightning.models.knet import KNet
from knet_lightning.models.swin import SwinBackbone

BACKBONES = {
    # the smallest Swin of the paper, stochastic depth as the ADE20K configs
    "swin-t": {"backbone_type": "swin", "swin_arch": "tiny", "drop_path_rate": 0.3, "frozen_stages": -1},
    # mmdet's stage_with_dcn=(False, True, True, True) on a quarter-width ResNet-50
    "r50-dcn": {
        "backbone_depth": 50,
        "backbone_base_channels": 16,
        "backbone_dcn_stages": (False, True, True, True),
        "frozen_stages": -1,
    },  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_knet_with_the_backbone_trains_on_synthetic_data(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    root = generate_synthetic_panoptic(tmp_path / "synthetic", num_train=2, num_val=1, image_size=64, seed=3)
    dataset = COCOPanopticDataset(root, split="train", transforms=build_transforms(False, short_edge=None))
    info = dataset.class_info
    batch = collate_batch([dataset[0], dataset[1]])
    model = KNet(num_things=info.num_things, num_stuff=info.num_stuff, num_proposals=10, num_stages=2,
                 channels=32, num_groups=8, feedforward_channels=64, num_heads=4, **BACKBONES[name])  # fmt: skip
    assert isinstance(model.backbone, SwinBackbone) == name.startswith("swin")
    assert any(isinstance(m, DeformConv2dPack) for m in model.backbone.modules()) == name.endswith("dcn")
    criterion = KNetCriterion(info.num_things, info.num_stuff, num_proposals=10, matcher=HungarianMatcher())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()}  # frozen_stages=-1
    reached: set[str] = set()
    losses = []
    for _ in range(8):
        loss = torch.stack(list(criterion(model(batch["images"]), batch["targets"]).values())).sum()
        optimizer.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), n
            if p.grad is not None and p.grad.abs().sum() > 0:
                reached.add(n)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert trainable - reached == set(), f"no gradient: {sorted(trainable - reached)[:5]}"
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses
