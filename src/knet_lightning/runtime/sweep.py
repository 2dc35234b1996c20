"""Sweeps over the kernel count N and the update depth S: per-job model figures, the sweep's
summary table, and the W&B grouping of a sweep's runs.

* :class:`JobStats` (a Lightning callback, in ``callbacks/default.yaml``) logs the parameter
  count, the GFLOPs of one forward pass at the training input size and the training
  throughput, so they land in every run's ``metrics.json`` and loggers.
* :class:`SweepSummary` (a Hydra callback, in ``hydra/default.yaml``) rebuilds
  ``summary.csv`` and ``summary.md`` in the multirun folder after every job and at the end of
  the sweep, from the jobs' ``config_resolved.yaml`` and ``metrics.json``: a crash in job k
  still leaves the table of jobs 0..k-1.
* the resolvers ``knet.sweep_group`` and ``knet.sweep_tags`` give W&B runs of one multirun a
  common group (the multirun folder's name) and the tags ``N<num_proposals>``, ``S<num_stages>``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback as LightningCallback
from lightning.pytorch import LightningModule, Trainer
from omegaconf import DictConfig, ListConfig, OmegaConf

try:  # Hydra's callback base class; Hydra is a dependency, the guard only keeps imports cheap
    from hydra.experimental.callback import Callback as HydraCallback
except ImportError:  # pragma: no cover
    HydraCallback = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary"
# columns before the metrics, in this order
FIXED_COLUMNS = ("job", "N", "S", "task", "params_m", "gflops", "throughput", "status")
# metrics.json keys behind the fixed columns
STAT_KEYS = {"params_m": "model/params_m", "gflops": "model/gflops", "throughput": "train/throughput"}


# ---------------------------------------------------------------------- resolvers


def _multirun_dir() -> str | None:
    """The multirun folder when this process runs a job of a multirun, else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return str(hc.sweep.dir)


def sweep_group() -> str:
    """W&B group of this run: the multirun folder's name in a multirun, else ``""`` (none)."""
    sweep_dir = _multirun_dir()
    return Path(sweep_dir).name if sweep_dir else ""


def sweep_tags(tags: Any, num_proposals: Any, num_stages: Any) -> list[str]:
    """``tags`` plus ``N<num_proposals>`` and ``S<num_stages>`` for the jobs of a multirun."""
    if isinstance(tags, (ListConfig, DictConfig)):
        tags = OmegaConf.to_container(tags, resolve=True)
    out = [str(t) for t in (tags or [])]
    if _multirun_dir():
        out += [f"N{num_proposals}", f"S{num_stages}"]
    return out


# ---------------------------------------------------------------------- per-job figures


def _deform_conv2d_flops(
    input_shape: Sequence[int], weight_shape: Sequence[int], *args: Any, out_shape: Sequence[int], **kwargs: Any
) -> int:
    """FLOPs of ``torchvision::deform_conv2d``: the convolution's GEMM over the sampled columns
    and 4 multiply-adds per bilinearly sampled input value."""
    batch, in_channels = input_shape[0], input_shape[1]
    out_channels, group_channels, kh, kw = weight_shape
    positions = batch * out_shape[-2] * out_shape[-1]
    return 2 * out_channels * group_channels * kh * kw * positions + 8 * in_channels * kh * kw * positions


def _grid_sampler_flops(input_shape: Sequence[int], grid_shape: Sequence[int], *args: Any, out_shape: Sequence[int],
                        **kwargs: Any) -> int:  # fmt: skip
    """FLOPs of ``aten::grid_sampler_2d`` (bilinear): 4 multiply-adds per sampled value, the count
    of a deformable conv's sampling (:func:`~knet_lightning.models.dcn.sampled_deform_conv2d`)."""
    batch, channels = out_shape[0], out_shape[1]
    return 8 * batch * channels * out_shape[-2] * out_shape[-1]


def model_complexity(net: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Parameters (millions) and GFLOPs of one forward pass of ``images`` (one image).

    FLOPs are torch's ``FlopCounterMode`` count (a multiply-add is 2 FLOPs; mmcv's
    ``get_flops``, used by the paper's tables, counts it as 1); a deformable conv (torchvision's
    op, or on the CPU bilinear sampling + matmul), which torch does not count whole, counts as its
    convolution plus the bilinear sampling (4 multiply-adds per sampled value). The network runs in eval mode without gradients, so BN
    statistics and RNG state are untouched.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.ops import deform_conv2d  # noqa: F401  (registers torch.ops.torchvision)

    params = sum(p.numel() for p in net.parameters())
    was_training = net.training
    net.eval()
    try:
        # inference_mode, not no_grad: the semantic decode heads return a view of conv_seg.weight
        # as their kernels, and under no_grad that view requires grad without a grad_fn, which
        # FlopCounterMode's module tracker rejects ("Expected gradient function to be set")
        mapping = {torch.ops.torchvision.deform_conv2d: _deform_conv2d_flops,
                   torch.ops.aten.grid_sampler_2d: _grid_sampler_flops}  # fmt: skip
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            net(images)
    finally:
        net.train(was_training)
    return {"params_m": params / 1e6, "gflops": counter.get_total_flops() / 1e9}


class JobStats(LightningCallback):
    """Logs ``model/params_m``, ``model/gflops`` (one forward pass of the first training image,
    at its padded size), ``train/throughput`` (training images per second over the epoch,
    summed over processes; the time of forward, backward and optimizer step, not data loading)
    and, on GPU, ``train/peak_memory_mb`` (the largest ``max_memory_allocated`` of the
    processes) at the end of every training epoch."""

    def __init__(self) -> None:
        self.complexity: dict[str, float] | None = None
        self._images = 0
        self._seconds = 0.0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._images, self._seconds = 0, 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.complexity is None:
            net = getattr(pl_module, "net", pl_module)
            self.complexity = model_complexity(net, batch["images"][:1])
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is not None:
            self._seconds += time.perf_counter() - self._start
            self._images += int(batch["images"].shape[0])
            self._start = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.complexity is None or self._seconds <= 0:
            return
        rate = torch.tensor(self._images / self._seconds, dtype=torch.float64, device=pl_module.device)
        # a collective on every rank: each rank's rate adds up to the job's throughput
        rate = trainer.strategy.reduce(rate, reduce_op="sum")
        # every value is the same on all ranks (reduced above, or of the same network): sync_dist
        # tells Lightning they are global, the mean of equal values being that value
        pl_module.log("model/params_m", self.complexity["params_m"], sync_dist=True)
        pl_module.log("model/gflops", self.complexity["gflops"], sync_dist=True)
        pl_module.log("train/throughput", float(rate), sync_dist=True)
        if pl_module.device.type == "cuda":
            peak = torch.tensor(torch.cuda.max_memory_allocated(pl_module.device) / 2**20, device=pl_module.device)
            pl_module.log("train/peak_memory_mb", float(trainer.strategy.reduce(peak, reduce_op="max")), sync_dist=True)


# ---------------------------------------------------------------------- summary table


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(dirs, key=lambda p: int(p.name))


def _read_job(job_dir: Path) -> dict[str, Any] | None:
    """One row of the table, or ``None`` for a folder that holds no job's config yet."""
    cfg_path = job_dir / "config_resolved.yaml"
    if not cfg_path.is_file():
        return None
    cfg = OmegaConf.load(cfg_path)
    row: dict[str, Any] = {
        "job": int(job_dir.name),
        "N": OmegaConf.select(cfg, "model.num_proposals"),
        "S": OmegaConf.select(cfg, "model.num_stages"),
        "task": OmegaConf.select(cfg, "model.task"),
    }
    metrics_path = job_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        row["status"] = "done"
        for column, key in STAT_KEYS.items():
            row[column] = metrics.get(key)
        row.update({k: v for k, v in metrics.items() if k not in STAT_KEYS.values()})
    else:
        row["status"] = "incomplete"
    return row


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    # training losses and learning rates are the loggers' business, not the comparison's
    keys = {k for row in rows for k in row if k not in FIXED_COLUMNS and not k.startswith(("train/", "lr-"))}

    def order(key: str) -> tuple[int, str]:
        split = key.split("/", 1)[0]
        return ({"val": 0, "test": 1}.get(split, 2), key)

    return sorted(keys, key=order)


# the metrics the Markdown table shows (the CSV has all): main numbers and PQ / mIoU per stage
_MARKDOWN_METRICS = ("val/pq", "val/miou", "val/map", "test/pq", "test/miou", "test/map")


_PER_STAGE = re.compile(r"^(val/(?:pq|miou))_s(\d+)$")


def _markdown_columns(metric_columns: list[str]) -> list[str]:
    matches = [(m.group(1), int(m.group(2)), k) for k in metric_columns if (m := _PER_STAGE.match(k))]
    per_stage = [k for _, _, k in sorted(matches)]
    return [k for k in _MARKDOWN_METRICS if k in metric_columns] + per_stage


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    # a reader (or a concurrent job of a parallel launcher) never sees half a table
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(sweep_dir: str | Path, name: str = SUMMARY_NAME) -> Path | None:
    """Writes ``<sweep_dir>/<name>.csv`` and ``.md`` from the job folders; returns the CSV path
    (``None`` when no job has started)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return None
    rows = [row for row in (_read_job(d) for d in _job_dirs(sweep_dir)) if row is not None]
    if not rows:
        return None
    metric_columns = _metric_columns(rows)
    columns = list(FIXED_COLUMNS) + metric_columns

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    csv_path = sweep_dir / f"{name}.csv"
    _atomic_write(csv_path, buf.getvalue())

    md_columns = list(FIXED_COLUMNS) + _markdown_columns(metric_columns)
    headers = {"params_m": "params (M)", "gflops": "GFLOPs", "throughput": "train img/s"}
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in md_columns) + " |",
        "|" + "|".join("---:" if c not in ("task", "status") else "---" for c in md_columns) + "|",
    ]
    for row in rows:
        cells = [_fmt(row.get(c), 3 if c == "gflops" else 2) for c in md_columns]
        lines.append("| " + " | ".join(cells) + " |")
    _atomic_write(sweep_dir / f"{name}.md", "\n".join(lines) + "\n")
    return csv_path


class SweepSummary(HydraCallback):
    """Hydra callback: the sweep's summary table, kept up to date in the multirun folder."""

    def __init__(self, name: str = SUMMARY_NAME) -> None:
        self.name = name

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        sweep_dir = _multirun_dir()
        if sweep_dir:
            write_summary(sweep_dir, self.name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(config.hydra.sweep.dir, self.name)
        if path is not None:
            log.info("sweep summary: %s and %s", path, path.with_suffix(".md"))
            print((path.with_suffix(".md")).read_text())
