"""``strict_reproduction=true``: train and evaluate with the numerics of the official runs.

The official K-Net configs (``configs/det/knet/*.py``, ``configs/knet/*.py`` of MMSegmentation)
train in fp32 with PyTorch's default conv layout. Our defaults trade exactness for speed: bf16
autocast and cuDNN autotuning on GPUs, TF32 matmuls (``matmul_precision: high``), channels-last
where it is faster, and CUDA's nondeterministic scatter/index kernels. This preset turns all of
them off at once. Grouped batching (MMDetection's ``GroupSampler``) needs no preset: the data
configs of the data sets the official detection runs group (COCO) have it on, and MMSegmentation
does not group. The README ("Reproducing the paper") lists what differs without it.

A setting the command line gives explicitly and the preset contradicts is an error naming both,
never a silent choice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from knet_lightning.settings import override_key

__all__ = ["STRICT_SETTINGS", "apply_strict_reproduction", "strict_runtime"]

log = logging.getLogger(__name__)

# config key -> (value, why); a key absent from the composed config is skipped
STRICT_SETTINGS: dict[str, tuple[Any, str]] = {
    "trainer.precision": ("32-true", "fp32 training, as every official config (no bf16/fp16 autocast)"),
    "matmul_precision": ("highest", "fp32 matmuls, no TF32"),
    "trainer.benchmark": (False, "no cuDNN autotuning: the same algorithms in every run"),
    "trainer.deterministic": ("warn", "deterministic kernels where torch has them (a warning where not)"),
    "model.channels_last": (False, "the official NCHW layout, so convolutions sum in its order"),
}


def _overridden(key: str, overrides: Iterable[str]) -> bool:
    # the key itself; a group choice (trainer=ddp) sets defaults, which the preset may change
    return any(override_key(item) == key for item in overrides)


def apply_strict_reproduction(cfg: DictConfig, overrides: Iterable[str] = ()) -> list[str]:
    """Set :data:`STRICT_SETTINGS` in ``cfg`` (in place) when ``cfg.strict_reproduction``.

    Args:
        cfg: the composed run config.
        overrides: the command line's overrides (Hydra's ``overrides.task``).

    Returns:
        ``"key=value"`` of each setting changed (empty when the preset is off).

    Raises:
        ValueError: the command line sets a key of the preset to another value.
    """
    if not cfg.get("strict_reproduction", False):
        return []
    overrides = list(overrides)
    changed, conflicts = [], []
    for key, (value, why) in STRICT_SETTINGS.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            continue  # this data set or trainer has no such setting
        current = node[leaf]
        if current == value:
            continue
        if _overridden(key, overrides):
            conflicts.append(f"{key}={current!r} (strict_reproduction needs {value!r}: {why})")
            continue
        node[leaf] = value
        changed.append(f"{key}={value}")
    if conflicts:
        raise ValueError(
            "strict_reproduction=true contradicts the command line's "
            + "; ".join(conflicts)
            + ": drop these overrides or strict_reproduction"
        )
    log.info("strict_reproduction: %s", ", ".join(changed) if changed else "the config already matches")
    return changed


def strict_runtime() -> None:
    """The process-wide switches of the preset that no config key reaches: no TF32 in cuDNN
    convolutions (``matmul_precision`` only covers matmuls), and the cuBLAS workspace that
    deterministic CUDA matmuls need (set before CUDA starts, as torch's reproducibility notes say)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
