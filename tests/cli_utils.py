"""Helpers to compose and run the Hydra app in-process, as the CLI would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from knet_lightning.cli import config_dir, run

# a K-Net small enough to run a few CPU steps in seconds
TINY_MODEL = [
    "model.num_proposals=6",
    "model.num_stages=1",
    "model.net.backbone_depth=18",
    "model.net.channels=32",
    "model.net.num_groups=8",
    "model.net.feedforward_channels=64",
    "model.net.num_heads=2",
]
TINY_DATA = [
    "data.num_train=8",
    "data.num_val=4",
    "data.image_size=64",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "data.num_workers=0",
    "data.persistent_workers=false",
]


def compose_cfg(tmp_path: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    """The composed config with the ``hydra`` node set up, outputs under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.work_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def run_cfg(cfg: DictConfig) -> float | None:
    """Runs the app on a composed config (what ``@hydra.main`` does, without the launcher)."""
    HydraConfig.instance().set_config(cfg)
    try:
        return run(cfg)
    finally:
        GlobalHydra.instance().clear()


def tiny_overrides(*extra: str, data_dir: Path | None = None) -> list[str]:
    out = TINY_MODEL + TINY_DATA + ["trainer.max_epochs=1", "trainer.log_every_n_steps=1"]
    return out + list(extra)


def metrics_csv(run_dir: Path) -> list[dict[str, Any]]:
    import csv

    path = run_dir / "csv" / "version_0" / "metrics.csv"
    with path.open() as fh:
        return list(csv.DictReader(fh))


def assert_same_run(resumed: Path, baseline: Path, steps: int) -> None:
    """Two run folders ended alike, bit for bit: ``steps`` optimizer steps, every weight and
    buffer, Adam's moments, the lr scheduler, and the validation PQ and mIoU of ``metrics.json``
    (an interrupted and resumed run against the uninterrupted one)."""
    import json

    import torch

    from knet_lightning.checkpoint.io import load_checkpoint_file

    a, b = (load_checkpoint_file(d / "checkpoints" / "last.ckpt") for d in (resumed, baseline))
    assert a["global_step"] == b["global_step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differing = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differing, f"weights differ from the uninterrupted run: {differing[:5]}"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (resumed, baseline))
    assert ma["val/pq"] == mb["val/pq"] and ma["val/miou"] == mb["val/miou"]
