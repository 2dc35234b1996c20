"""``strict_reproduction=true`` (knet_lightning.runtime.reproduction): the official runs' numerics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from cli_utils import compose_cfg, run_cfg, tiny_overrides
from omegaconf import OmegaConf

from knet_lightning.runtime.reproduction import apply_strict_reproduction


@pytest.fixture
def restore_torch_switches():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())  # fmt: skip
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[2], saved[3]
    torch.set_float32_matmul_precision(saved[4])


def test_the_preset_turns_off_every_fast_but_inexact_setting(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, ["trainer=ddp", "strict_reproduction=true"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.benchmark and cfg.matmul_precision == "high"
    changed = apply_strict_reproduction(cfg, ["trainer=ddp", "strict_reproduction=true"])
    assert cfg.trainer.precision == "32-true" and cfg.trainer.benchmark is False
    assert cfg.trainer.deterministic == "warn" and cfg.matmul_precision == "highest"
    assert cfg.model.channels_last is False
    assert "trainer.precision=32-true" in changed and "model.channels_last=False" in changed
    # off: nothing changes
    plain = compose_cfg(tmp_path, ["trainer=ddp"])
    before = OmegaConf.to_container(plain)
    assert apply_strict_reproduction(plain, []) == [] and OmegaConf.to_container(plain) == before


def test_a_contradicting_override_is_an_error_naming_it(tmp_path: Path) -> None:
    overrides = ["trainer=ddp", "strict_reproduction=true", "trainer.precision=bf16-mixed"]
    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(ValueError, match=r"trainer\.precision='bf16-mixed' \(strict_reproduction needs '32-true'"):
        apply_strict_reproduction(cfg, overrides)


def test_a_strict_run_records_and_applies_the_preset(tmp_path: Path, restore_torch_switches: None) -> None:
    run_cfg(compose_cfg(tmp_path, tiny_overrides("strict_reproduction=true", "debug=fast_dev_run")))
    saved = yaml.safe_load((tmp_path / "run" / "config_resolved.yaml").read_text())
    assert saved["trainer"]["precision"] == "32-true" and saved["trainer"]["deterministic"] == "warn"
    assert saved["model"]["channels_last"] is False and saved["matmul_precision"] == "highest"
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
