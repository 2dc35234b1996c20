"""The experiment loggers of ``conf/logger/`` where Lightning's own ones print what no user can
act on.

* :class:`WandbLogger`: Lightning's W&B logger without the ``anonymous`` argument that it hands
  to ``wandb.init`` on every run, which makes wandb >= 0.19 warn "The anonymous setting has no
  effect" whatever its value.
* :func:`drop_lightning_noise`: drops the few lines of Lightning's rank-zero log that say
  nothing about the run (:data:`LIGHTNING_NOISE`, each with its reason); the others (the device,
  the checkpoint a test loads, why a fit stopped) still show.
* :func:`print_results`: a run's results table; :func:`finish_loggers`: W&B runs flushed and closed.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["LIGHTNING_NOISE", "WandbLogger", "drop_lightning_noise", "finish_loggers", "print_results"]

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


def format_value(value: float) -> str:
    """Metrics in percent with two decimals; small values (learning rates) with three
    significant digits rather than as 0.00."""
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.2f}"


def print_results(title: str, metrics: dict[str, Any], caption: str = "") -> None:
    """A results table on stdout (rich if available), ``caption`` under it."""
    rows = [(k, float(v)) for k, v in sorted(metrics.items()) if not k.startswith("train/")]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, caption=caption or None)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in rows:
            table.add_row(k, format_value(v))
        Console(width=100).print(table)
    except ImportError:  # pragma: no cover - rich is a dependency
        print(title)
        for k, v in rows:
            print(f"{k:>24s} {format_value(v):>8s}")
        print(caption)


def finish_loggers(loggers: list[Any]) -> None:
    """Flush and close W&B runs: several jobs of a sweep may share one process, and an offline
    run holds its last records until it is finished."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
