"""The Lightning callbacks of knet-lightning that report and export (the ones that write
checkpoints are in :mod:`knet_lightning.training.checkpointing`).

* :class:`PredictionOverlays`: the task's overlays of a few validation images (PNG, W&B).
* :class:`PredictionExport`: predictions streamed to the task's official format.
* :class:`BadSampleReport`: with ``on_bad_sample=skip`` it counts and reports the skipped files.
* :class:`FrozenModulesNote`: says which backbone modules stay in eval mode while training, in
  place of Lightning's warning about them.
* :class:`ValidationResults`: each validation's results, in one line.
* :class:`ProgressBar`, :class:`ModelSummary`: Lightning's rich ones without what reads as
  noise here (the logger version ``v_num``, FLOPs counted as 0).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, RichModelSummary, RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from knet_lightning.data.meta import default_palette
from knet_lightning.postprocess.visualize import save_png

log = logging.getLogger(__name__)


class PredictionOverlays(Callback):
    """Saves the predictions of a few fixed validation images as overlay PNGs in the run folder
    (``overlays/epoch_XXX/``) and, with a W&B logger, logs them as ``wandb.Image`` with the class
    masks attached. The task object draws them (panoptic segments, instances or classes).

    The module's ``validation_step`` returns the samples it selected (``{"vis": [...]}``), on
    rank zero only, from the first validation batches, which are the same images every epoch
    because the validation loader does not shuffle; this callback collects them from the step's
    outputs, up to ``pl_module.num_vis_images``.
    """

    def __init__(self, dirname: str = "overlays", every_n_epochs: int = 1) -> None:
        self.dirname = dirname
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.samples: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.samples = []

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        room = int(getattr(pl_module, "num_vis_images", 0)) - len(self.samples)
        if isinstance(outputs, dict) and room > 0:
            self.samples.extend(list(outputs.get("vis") or [])[:room])

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        samples, self.samples = self.samples, []
        if not samples or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        colors = pl_module.colors or default_palette(len(pl_module.class_names))
        out_dir = Path(trainer.default_root_dir) / self.dirname / f"epoch_{trainer.current_epoch:03d}"
        images = []
        for i, sample in enumerate(samples):
            overlay = pl_module.task.overlay(sample["image"], sample["prediction"], colors)
            save_png(overlay, out_dir / f"{i:02d}_{Path(sample['file_name']).stem}.png")
            images.append((overlay, sample))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, images, pl_module, trainer.global_step)

    @staticmethod
    def _log_wandb(logger: WandbLogger, images: list[tuple[torch.Tensor, dict]], pl_module: Any, step: int) -> None:
        import wandb

        class_labels = {i + 1: name for i, name in enumerate(pl_module.class_names)}
        class_labels[0] = "void"
        logged = []
        for overlay, sample in images:
            # W&B's mask overlay wants a class map; 0 is void, class c is c + 1
            sem = pl_module.task.class_map(sample["prediction"]).cpu()
            logged.append(
                wandb.Image(
                    overlay.permute(1, 2, 0).numpy(),
                    caption=sample["file_name"],
                    masks={"prediction": {"mask_data": sem.numpy(), "class_labels": class_labels}},
                )
            )
        logger.experiment.log({"val/overlays": logged, "trainer/global_step": step})


class PredictionExport(BasePredictionWriter):
    """Streams ``predict_step`` outputs to disk in the official formats as batches arrive
    (COCO panoptic PNG + JSON, COCO results JSON with RLE, label PNGs), so nothing accumulates
    in memory. Under DDP every process writes its own images and its own JSON
    (``panoptic.rank<r>.json``); a single process writes ``panoptic.json``.

    The module's task object chooses the format and writes each image.
    """

    def __init__(self, out_dir: str | Path, class_info: Any) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.class_info = class_info
        self.writer: Any = None
        self.count = 0

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        self.writer = pl_module.task.open_writer(self.out_dir, self.class_info, suffix=suffix)
        self.count = 0

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for item in prediction:
            pl_module.task.write(self.writer, item["image_id"], item["file_name"], item["prediction"])
            self.count += 1

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # never leave a JSON that looks complete after a crash
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


class BadSampleReport(Callback):
    """Counts the training samples skipped under ``data.on_bad_sample=skip`` (the replacements
    carry ``target["skipped"]``), logs ``train/skipped_samples`` and lists them at epoch end."""

    def __init__(self, max_listed: int = 20) -> None:
        self.max_listed = int(max_listed)
        self.epoch_skipped: list[str] = []
        self.total = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_skipped = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict):
            for target in batch.get("targets", []):
                self.epoch_skipped.extend(target.pop("skipped", []) if isinstance(target, dict) else [])

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        local = torch.tensor(float(len(self.epoch_skipped)), device=pl_module.device)
        count = int(trainer.strategy.reduce(local, reduce_op="sum").item())
        self.total += count
        # summed over the ranks above; sync_dist: a global value, the same on every rank
        pl_module.log("train/skipped_samples", float(count), on_epoch=True, on_step=False, batch_size=1, sync_dist=True)
        if self.epoch_skipped:
            listed = "\n  ".join(self.epoch_skipped[: self.max_listed])
            more = len(self.epoch_skipped) - self.max_listed
            log.warning(
                "epoch %d: skipped %d bad training sample(s) (data.on_bad_sample=skip):\n  %s%s",
                trainer.current_epoch,
                count,
                listed,
                f"\n  ... and {more} more" if more > 0 else "",
            )


class FrozenModulesNote(Callback):
    """The backbones keep their frozen stages and (ResNet with ``norm_eval``, as mmdet's) every
    BatchNorm in eval mode while training, by design; Lightning warns of any module in eval
    mode at the start of training as possibly unexpected. When the modules in eval mode are
    exactly the backbone's (``modules_in_eval_mode()``), this logs what they are and why instead,
    and that one warning is not shown; any other module in eval mode still gets it."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        backbone = getattr(getattr(pl_module, "net", None), "backbone", None)
        if not hasattr(backbone, "modules_in_eval_mode"):
            return
        by_design = {id(m) for m in backbone.modules_in_eval_mode()}
        in_eval = [m for m in pl_module.modules() if not m.training]
        if not in_eval or any(id(m) not in by_design for m in in_eval):
            return
        warnings.filterwarnings(
            "ignore", message=re.escape(f"Found {len(in_eval)} module(s) in eval mode at the start of training")
        )
        norm_eval = getattr(backbone, "norm_eval", False)
        log.info(
            "%d backbone modules stay in eval mode while training, by design: frozen_stages=%d%s",
            len(in_eval),
            backbone.frozen_stages,  # fmt: skip
            " and norm_eval (every BatchNorm keeps its pretrained statistics)" if norm_eval else "",
        )


class ValidationResults(Callback):
    """Prints each validation's results in one line (global rank zero), the task's metrics of
    its output stage (``val/pq``, ``val/miou`` ...; the per-stage ``val/*_s<k>`` are in the
    metrics files). The progress bar shows the training loss only, and a validation (every 5th
    epoch in the default run) showed nothing until the final table."""

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and not re.search(r"_s\d+$", k)
        }
        if values:
            log.info(
                "validation, epoch %d (step %d): %s",
                trainer.current_epoch,
                trainer.global_step,
                ", ".join(f"{k} {v:.2f}" for k, v in sorted(values.items())),
            )


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar without ``v_num``, the logger's version (always 0: every run
    has its own folder, printed at the start and at the end of the run). ``get_metrics`` is the
    hook Lightning documents for choosing the bar's items."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without its FLOPs column and "Total FLOPs" line. Lightning
    counts FLOPs only by running the module's ``example_input_array``, which K-Net has none of
    (the input size is the data's), so it printed 0 for every module. The FLOPs of one forward
    pass of a training image are ``model/gflops`` in the results table and the metrics
    (:class:`~knet_lightning.runtime.sweep.JobStats`, measured at the first training step)."""

    def _summary(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        with warnings.catch_warnings():
            if str(trainer.precision).endswith("-mixed"):
                # mixed precision keeps the parameters in fp32, the 32 bits Lightning then counts:
                # its "not supported ... will not be accurate" is wrong for these
                warnings.filterwarnings("ignore", message=r"Precision \S+-mixed is not supported by the model summary")
            return super()._summary(trainer, pl_module)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        # the columns and lines of RichModelSummary.summarize (Lightning 2.6), less the FLOPs
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            right = name in ("Params", "Params per Device", "In sizes", "Out sizes")
            table.add_column(name, justify="right" if right else "left", style="dim" if name == " " else None)
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)
