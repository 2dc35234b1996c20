"""Helpers to compose and run the Hydra app in-process, as the CLI would."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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


def run_cfg(cfg: DictConfig) -> Optional[float]:
    """Runs the app on a composed config (what ``@hydra.main`` does, without the launcher)."""
    HydraConfig.instance().set_config(cfg)
    try:
        return run(cfg)
    finally:
        GlobalHydra.instance().clear()


def tiny_overrides(*extra: str, data_dir: Optional[Path] = None) -> list[str]:
    out = TINY_MODEL + TINY_DATA + ["trainer.max_epochs=1", "trainer.log_every_n_steps=1"]
    return out + list(extra)


def metrics_csv(run_dir: Path) -> list[dict[str, Any]]:
    import csv

    path = run_dir / "csv" / "version_0" / "metrics.csv"
    with path.open() as fh:
        return list(csv.DictReader(fh))
