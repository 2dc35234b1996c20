"""Lightning callbacks of knet-lightning."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from knet_lightning.evaluation.export import open_writer, write_item
from knet_lightning.visualize import overlay_panoptic, save_png

log = logging.getLogger(__name__)


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Deterministic distinct-ish colours for data sets without their own."""
    gen = torch.Generator().manual_seed(1234)
    colors = torch.randint(40, 256, (num_classes, 3), generator=gen)
    return [tuple(int(v) for v in c) for c in colors]


class PredictionOverlays(Callback):
    """Saves the panoptic predictions of a few fixed validation images as overlay PNGs in the
    run folder (``overlays/epoch_XXX/``) and, with a W&B logger, logs them as ``wandb.Image``
    with the segment masks attached.

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
        colors = pl_module.colors or default_palette(pl_module.num_classes)
        out_dir = Path(trainer.default_root_dir) / self.dirname / f"epoch_{trainer.current_epoch:03d}"
        images = []
        for i, sample in enumerate(samples):
            overlay = overlay_panoptic(sample["image"], sample["pan_seg"], sample["segments_info"], colors)
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
            seg = sample["pan_seg"]
            sem = torch.zeros_like(seg, dtype=torch.int64)
            for s in sample["segments_info"]:
                sem[seg == s["id"]] = int(s["category_id"]) + 1
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

    Semantic label PNGs hold the data set's own class ids by default (``class_info.dataset_id``:
    Cityscapes labelIds, ADE20K 1..150 with 0 = other), which is what the official evaluation
    scripts read; pass ``semantic_id_map`` to write other ids.
    """

    def __init__(self, out_dir: str | Path, class_info: Any, task: str, semantic_id_map: Any = None) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.class_info = class_info
        self.task = task
        if semantic_id_map is None and task == "semantic":
            semantic_id_map = [class_info.dataset_id(c) for c in range(class_info.num_classes)]
        self.semantic_id_map = semantic_id_map
        self.writer: Any = None
        self.count = 0

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        self.writer = open_writer(self.out_dir, self.class_info, self.task, self.semantic_id_map, suffix=suffix)
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
            write_item(self.writer, item)
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
