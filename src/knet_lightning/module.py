"""KNetModule: the LightningModule that trains a K-Net and hands evaluation to its task.

It owns the network (``KNet`` or ``SemanticKNet``), the criterion (matcher + losses), and the
optimizer and learning-rate policy of the official configs (:mod:`knet_lightning.training.optim`).
Post-processing, ground truth, metrics, overlays and output formats belong to the task object
(:mod:`knet_lightning.tasks`); nothing here branches on the task or knows a data-set format.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from knet_lightning.checkpoint.keys import DATA_CONFIG_KEY, INFERENCE_KEY, MODEL_CONFIG_KEY
from knet_lightning.errors import NonFiniteLossError
from knet_lightning.inference.test_time import TestTimeSettings, run_test_time, settings_for_task
from knet_lightning.models.outputs import StageOutput
from knet_lightning.postprocess.visualize import denormalized_image
from knet_lightning.runtime.memory_format import choose_memory_format
from knet_lightning.settings import settings_from
from knet_lightning.tasks import SegmentationTask, build_task
from knet_lightning.training import optim

log = logging.getLogger(__name__)


class KNetModule(LightningModule):
    """Training, evaluation and prediction of K-Net for one task.

    Args:
        net: the network; ``net(images (B,3,H,W)) -> list[StageOutput]`` (stage 0..S). Its
            ``num_stages`` and ``num_proposals`` are the only source of S and N.
        criterion: ``criterion(outputs, targets) -> dict[str, Tensor]`` of weighted loss terms.
        task: ``panoptic``, ``instance`` or ``semantic`` (:mod:`knet_lightning.tasks`).
        optimizer: :class:`~knet_lightning.training.optim.OptimizerSettings` fields.
        scheduler: :class:`~knet_lightning.training.optim.SchedulerSettings` fields.
        postprocess: the task's settings (:mod:`knet_lightning.tasks.settings`).
        eval_all_stages: evaluate every stage depth at validation, not only the last.
        num_vis_images: validation images kept for overlays each epoch (rank zero).
        class_names / isthing / colors: data-set metadata, stored in the checkpoint.
        max_bad_steps: a NaN/Inf loss skips its optimizer step; more than this many consecutive
            such steps stop the run with :class:`NonFiniteLossError`.
        channels_last: run the network in the channels-last memory format; ``"auto"``: where it
            is the faster layout (:mod:`knet_lightning.runtime.memory_format`), decided once the device is known.
        compile: ``torch.compile`` the network in place (parameter names stay as they are).
        test_time: :class:`~knet_lightning.inference.test_time.TestTimeSettings` or its fields: how evaluation runs the network.
    """

    def __init__(
        self,
        net: nn.Module,
        criterion: nn.Module,
        task: str = "panoptic",
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        postprocess: Mapping[str, Any] | None = None,
        eval_all_stages: bool = True,
        num_vis_images: int = 4,
        class_names: list[str] | None = None,
        isthing: list[bool] | None = None,
        colors: list[list[int]] | None = None,
        max_bad_steps: int = 20,
        channels_last: bool | str = "auto",
        compile: bool = False,
        test_time: Mapping[str, Any] | TestTimeSettings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "criterion", "test_time"], logger=False)  # test_time: model_config
        self.net = net
        self.criterion = criterion
        self.optimizer_settings = settings_from(optim.OptimizerSettings, optimizer, "model.optimizer")
        self.scheduler_settings = settings_from(optim.SchedulerSettings, scheduler, "model.scheduler")
        if int(max_bad_steps) < 0:
            raise ValueError(f"max_bad_steps must be >= 0, got {max_bad_steps}")
        self.max_bad_steps = int(max_bad_steps)
        self.bad_steps = 0  # consecutive steps with a non-finite loss
        if int(num_vis_images) < 0:
            raise ValueError(f"model.num_vis_images must be >= 0, got {num_vis_images}")
        self.num_vis_images = int(num_vis_images)
        if channels_last not in (True, False, "auto"):
            raise ValueError(f"model.channels_last={channels_last!r}: expected true, false or auto")
        # None until "auto" meets a device (setup() for a Trainer, else the first forward)
        self.channels_last: bool | None = None if channels_last == "auto" else bool(channels_last)
        if self.channels_last:
            # loading a checkpoint copies into these parameters and keeps their layout
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()

        num_classes = int(net.num_classes)
        num_things = int(getattr(net, "num_things", 0))
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.isthing = list(isthing) if isthing else [i < num_things for i in range(num_classes)]
        self.colors = [tuple(c) for c in colors] if colors else None
        if len(self.class_names) > num_classes:
            # instance mode on a panoptic data set (things first, then stuff): the network
            # classifies the things only, so the stuff classes drop out of names and metrics
            if any(not t for t in self.isthing[:num_classes]):
                raise ValueError(
                    f"model.task={task}: the network predicts {num_classes} classes, which must be the data set's "
                    f"first (thing) classes, got isthing={self.isthing[:num_classes]}"
                )
            self.class_names = self.class_names[:num_classes]
            self.isthing = self.isthing[:num_classes]
            self.colors = self.colors[:num_classes] if self.colors else None
        self.task: SegmentationTask = build_task(
            task, num_classes=num_classes, num_things=num_things, num_proposals=int(net.num_proposals),
            num_stages=int(net.num_stages), eval_all_stages=eval_all_stages, settings=postprocess,
            class_names=self.class_names,
        )  # fmt: skip
        self.test_time = settings_for_task(test_time, self.task)  # whole, slide, multi-scale + flip
        # set by the CLI, stored in checkpoints, for eval/predict and Segmenter to rebuild from (checkpoint/model.py)
        self.model_config: dict[str, Any] | None = None
        self.inference_config: dict[str, Any] | None = None
        self.data_config: dict[str, Any] | None = None

    @property
    def num_stages(self) -> int:
        return int(self.net.num_stages)

    @property
    def num_proposals(self) -> int:
        return int(self.net.num_proposals)

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> list[StageOutput]:
        """``images (B, 3, H, W)`` normalized, H and W multiples of 32 → stage outputs 0..S."""
        if self.channels_last is None:
            self.channels_last = choose_memory_format(self.net, images.device, self.training)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = {MODEL_CONFIG_KEY: self.model_config, INFERENCE_KEY: self.inference_config,
                  DATA_CONFIG_KEY: self.data_config}  # fmt: skip
        checkpoint.update({key: value for key, value in stored.items() if value is not None})

    def setup(self, stage: str) -> None:
        # before configure_optimizers and checkpoint loading, which keep the parameters' layout
        if self.channels_last is None:
            self.channels_last = choose_memory_format(self.net, self.trainer.strategy.root_device, stage == "fit")

    # ------------------------------------------------------------------ training
    def training_loss(self, images: Tensor, targets: list[dict[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        """The summed training loss of a batch and its weighted terms (forward + matching + losses)."""
        losses = self.criterion(self(images), targets)
        return torch.stack(list(losses.values())).sum(), losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        images, targets = batch["images"], batch["targets"]
        loss, losses = self.training_loss(images, targets)
        batch_size = images.shape[0]
        # every rank must agree, or DDP would wait forever for the gradients of a skipping rank
        bad = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        if bad:
            return self._skip_non_finite(losses, targets, batch_idx)
        self.bad_steps = 0
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    def _skip_non_finite(self, losses: dict[str, Tensor], targets: list[dict[str, Any]], batch_idx: int) -> None:
        """Logs a non-finite loss with the batch's images; returning None makes Lightning skip
        the backward pass and the optimizer step."""
        self.bad_steps += 1
        terms = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v).all()}
        images = [f"{t.get('image_id', '?')}:{t.get('file_name', '?')}" for t in targets]
        log.warning(
            "non-finite training loss at step %d (batch %d, %d consecutive): terms %s; images %s; "
            "the optimizer step is skipped",
            *(self.global_step, batch_idx, self.bad_steps, terms or "(on this rank all finite)", images),
        )
        self.log("train/skipped_steps", float(self.bad_steps), batch_size=1)
        if self.bad_steps > self.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive training steps had a NaN/Inf loss (max_bad_steps="
                f"{self.max_bad_steps}); last terms {terms}, images {images}. Lower the learning rate, "
                "check the data (or raise max_bad_steps)"
            )
        return None

    # ------------------------------------------------------------------ evaluation
    def network_outputs(self, batch: dict[str, Any], stages: list[int]) -> Iterator[tuple[list[Any], dict[str, Any]]]:
        """``(outputs under model.test_time, None at stages not asked for; part)`` per ``task.network_batches``."""
        for part in self.task.network_batches(batch):
            yield run_test_time(self, part, self.test_time, stages, self.inference_config), part

    def predict_batch(self, batch: dict[str, Any], stage_index: int = -1) -> list[Any]:
        """Post-processed predictions of one stage for every image, at original image size."""
        return [p for outputs, part in self.network_outputs(batch, [stage_index])
                for p in self.task.predict(outputs[stage_index], part)]  # fmt: skip

    def _evaluate(self, batch: dict[str, Any], split: str) -> list[Any]:
        """Updates ``split``'s metrics with a batch; returns the last stage's predictions."""
        return [p for outputs, part in self.network_outputs(batch, self.task.stages(split))
                for p in self.task.evaluate(outputs, part, split)]  # fmt: skip

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list[dict[str, Any]]]:
        """``{"vis": samples}``: the overlay samples of this batch, for the overlay callback"""
        return {"vis": self._overlay_samples(batch, batch_idx, self._evaluate(batch, "val"))}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        # the values are global already (the task's torchmetrics sync their states); sync_dist
        # tells Lightning so: the mean over processes of one value is that value
        self.log_dict(self.task.compute("val"), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.task.compute("test"), sync_dist=True)

    def _overlay_samples(self, batch: dict[str, Any], batch_idx: int, preds: list[Any]) -> list[dict[str, Any]]:
        """Rank zero's first ``num_vis_images`` validation images (the loader does not shuffle; the
        batches before this one held at least ``batch_idx * len(preds)``; the callback keeps the count)."""
        if not self.trainer.is_global_zero:
            return []
        room = self.num_vis_images - batch_idx * len(preds)
        return [{"file_name": str(t.get("file_name", b)), "prediction": pred,
                 "image": denormalized_image(batch, b, tuple(int(s) for s in t["orig_size"]))}
                for b, (t, pred) in enumerate(zip(batch["targets"][: max(room, 0)], preds))]  # fmt: skip

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        return [{"file_name": t.get("file_name"), "image_id": t.get("image_id"), "prediction": p}
                for t, p in zip(batch["targets"], self.predict_batch(batch))]  # fmt: skip

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        optimizer = optim.build_optimizer(self.net, self.optimizer_settings, optim.clips_under_amp(self._trainer))
        scheduler = optim.build_scheduler(optimizer, self.scheduler_settings, self._steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _steps_per_epoch(self) -> float:
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(total):
            return total / trainer.max_epochs
        raise ValueError(
            "model.scheduler.milestone_unit=epoch needs trainer.max_epochs; set it or give milestones in steps"
        )
