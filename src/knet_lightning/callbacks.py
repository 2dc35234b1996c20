"""The Lightning callbacks of knet-lightning.

* :class:`PredictionOverlays`: the task's overlays of a few validation images (PNG, W&B).
* :class:`PredictionExport`: predictions streamed to the task's official format.
* :class:`RunCheckpoint`: ``ModelCheckpoint`` confined to its run folder; ``last.ckpt`` at every
  training epoch end too.
* :class:`RNGStateCheckpoint`: the global torch / numpy / python RNG states (dropout) go into
  the checkpoint and are put back right before the first resumed training step.
* :class:`PreemptionCheckpoint`: on SIGTERM Lightning stops at the next step boundary; this
  callback writes ``last.ckpt`` there, so the run resumes with ``ckpt_path=last``.
* :class:`BadSampleReport`: with ``on_bad_sample=skip`` it counts and reports the skipped files.
* :class:`FrozenModulesNote`: says which backbone modules stay in eval mode while training, in
  place of Lightning's warning about them.
* :class:`ValidationResults`: each validation's results, in one line.
* :class:`ProgressBar`, :class:`ModelSummary`: Lightning's rich ones without what reads as
  noise here (the logger version ``v_num``, FLOPs counted as 0).
"""

from __future__ import annotations

import logging
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, RichModelSummary, RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from knet_lightning.data.meta import default_palette
from knet_lightning.visualize import save_png

log = logging.getLogger(__name__)


class PredictionOverlays(Callback):
    """Saves the predictions of a few fixed validation images as overlay PNGs in the run folder
    (``overlays/epoch_XXX/``) and, with a W&B logger, logs them as ``wandb.Image`` with the class
    masks attached. The task object draws them (panoptic segments, instances or classes).

    The module collects the samples (``pl_module.vis_samples``) while it validates, on rank
    zero only, from the first validation batches, which are the same images every epoch
    because the validation loader does not shuffle.
    """

    def __init__(self, dirname: str = "overlays", every_n_epochs: int = 1) -> None:
        self.dirname = dirname
        self.every_n_epochs = max(1, int(every_n_epochs))

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        samples: list[dict[str, Any]] = getattr(pl_module, "vis_samples", [])
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


def _rng_states() -> dict[str, Any]:
    # plain types only (lists, ints, tensors), so the checkpoint loads with weights_only=True
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    npst = states["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that tracks the best checkpoint of its own run folder only, and can
    rewrite ``last.ckpt`` at every training epoch end.

    A run resumed into a new folder (``ckpt_path=`` of another run) gets a checkpoint whose
    callback state names files of the old folder. Lightning then warns "The dirpath has
    changed" once per checkpoint callback and still restores ``best_model_path``, which points
    into the old folder (and a later, better checkpoint would delete that file). Here the old
    state is left with the old run: tracking starts anew in this folder, said in one line (in a
    fit only: ``mode=eval`` restores the callbacks too, but writes no checkpoint).

    Args:
        save_last_on_train_epoch_end: also write ``last.ckpt`` at the end of every training
            epoch. Lightning's own epoch-end save of ``last`` follows a top-k save only, and a
            monitored checkpoint saves when validation runs (every ``check_val_every_n_epoch``
            epochs), so without it a crash between two validations and two step checkpoints
            would lose every epoch since. The write runs after the epoch's validation (a
            monitoring callback's epoch-end hook comes last), so the file holds its result.
    """

    def __init__(self, *args: Any, save_last_on_train_epoch_end: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_last_on_train_epoch_end = bool(save_last_on_train_epoch_end)
        self._fitting = False
        self._found_files = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning warns here of a non-empty checkpoint folder, which is what a run resumed in
        # its own folder (the README's resume command) finds; which checkpoint the fit resumes
        # from is known only after setup, so the warning waits for on_train_start
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        folder = Path(self.dirpath) if self.dirpath else None
        self._found_files = stage == "fit" and folder is not None and folder.is_dir() and any(folder.iterdir())
        # setup runs before a checkpoint's callback states are restored (load_state_dict)
        self._fitting = stage == "fit"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # resumed from a checkpoint of this run folder (checkpoints/last.ckpt, SLURM's hpc_ckpt_<n>.ckpt)
        run_folder = Path(self.dirpath).resolve().parent if self.dirpath else None
        resumed_here = (
            trainer.ckpt_path is not None
            and run_folder is not None
            and Path(trainer.ckpt_path).resolve().is_relative_to(run_folder)
        )
        if self.save_top_k != 0 and self._found_files and not resumed_here:
            # a new fit among another run's checkpoints may overwrite them: Lightning's warning
            rank_zero_warn(f"Checkpoint directory {self.dirpath} exists and is not empty.")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # skipped when this callback already saved at this step (a step checkpoint on the
        # epoch's last step), in fast_dev_run, and outside fit; every rank calls it (DDP: the
        # save is collective, rank 0 writes, atomically through SafeCheckpointIO)
        if self.save_last_on_train_epoch_end and self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        before = state_dict.get("dirpath", self.dirpath)
        if before == self.dirpath:
            super().load_state_dict(state_dict)
            return
        if self.save_top_k != 0 and self.monitor and self._fitting:
            log.info(
                "resumed into a new folder: the best checkpoint by %s is tracked anew in %s (the earlier run's "
                "stays in %s)",
                self.monitor,
                self.dirpath,
                before,
            )


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states (torch, numpy, python, CUDA) in every checkpoint and puts them
    back right before the first training step of a resumed run.

    Restoring at ``on_train_batch_start`` rather than at load time matters: between loading and
    the first step Lightning builds loaders and prefetches, and the states must be those of the
    moment the checkpoint was written, which was also between two steps.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class PreemptionCheckpoint(Callback):
    """On SIGTERM (preemption, ``scancel``, a SLURM time limit) the run stops at the next step
    boundary and this callback writes ``<dirpath>/last.ckpt`` there, so ``ckpt_path=last`` (or
    ``auto_resume``) continues from that step, and the CLI exits with 143.

    SIGTERM is ours, SIGUSR1 the requeue's: under ``trainer=slurm`` it writes ``hpc_ckpt_<n>.ckpt``
    in the run folder and requeues the job, and the SIGTERM with which SLURM then ends the
    instance comes here (:mod:`knet_lightning.runtime.slurm` has the whole sequence). One process stops
    on Lightning's own ``trainer.received_sigterm``; in a distributed fit
    :class:`~knet_lightning.runtime.signals.StepBoundarySignals` sets it on every rank after the same
    step, so that the collective save below meets every rank there.

    Args:
        dirpath: checkpoint folder (the run's ``checkpoints/``).
        filename: file name of the checkpoint.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.saved_path: Path | None = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or not trainer.training and not trainer.validating:
            return
        if trainer.state.fn != "fit":
            return
        path = self.dirpath / self.filename
        trainer.save_checkpoint(path, weights_only=False)  # the full training state, for the resume
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM: saved %s at step %d (epoch %d); resume with ckpt_path=%s (or ckpt_path=last "
                "hydra.run.dir=%s)",
                path,
                trainer.global_step,
                trainer.current_epoch,
                path,
                trainer.default_root_dir,
            )


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
