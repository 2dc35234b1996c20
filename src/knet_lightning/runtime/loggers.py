"""The experiment loggers of ``conf/logger/`` where Lightning's own ones print what no user can
act on.

* :class:`WandbLogger`: Lightning's W&B logger without the ``anonymous`` argument that it hands
  to ``wandb.init`` on every run, which makes wandb >= 0.19 warn "The anonymous setting has no
  effect" whatever its value.
* :func:`drop_lightning_noise`: drops the few lines of Lightning's rank-zero log that say
  nothing about the run (:data:`LIGHTNING_NOISE`, each with its reason); the others (the device,
  the checkpoint a test loads, why a fit stopped) still show.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["LIGHTNING_NOISE", "WandbLogger", "drop_lightning_noise"]

# where Lightning's rank_zero_info writes (lightning/pytorch/utilities/rank_zero.py)
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
# the starts of the lines dropped, and why
LIGHTNING_NOISE = {
    "💡 Tip:": "Lightning 2.6 advertises its cloud services (LitLogger, litmodels) at every Trainer",
    "Loading `train_dataloader` to estimate number of stepping batches": (
        "the lr schedule asks for the run's step count, and Lightning says how it finds it"
    ),
    "TPU available: False": "this project runs on CPUs and GPUs (the GPU line stays: it says whether one is used)",
}


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(tuple(LIGHTNING_NOISE))


def drop_lightning_noise() -> None:
    """Filters the lines of :data:`LIGHTNING_NOISE` out of Lightning's rank-zero log
    (idempotent: the same filter function is added once)."""
    logging.getLogger(_RANK_ZERO_LOGGER).addFilter(_not_noise)


class WandbLogger(_LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` that leaves ``anonymous`` out of ``wandb.init``
    unless it was asked for: Lightning always passes it (``None`` by default), and wandb, which
    no longer has anonymous runs, then warns at every run that the setting has no effect."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
