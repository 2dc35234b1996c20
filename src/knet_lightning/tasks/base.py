"""What every segmentation task provides to :class:`~knet_lightning.module.KNetModule`.

A task object turns network outputs into its kind of prediction, the reader's target into its
kind of ground truth, keeps its metrics (one set per evaluated stage depth), draws its overlay
and writes its official output format. The LightningModule only trains and calls it; so a new
task is one new subclass here, and nothing else branches on the task's name.

Data flow of one validation batch::

    batch ──KNetModule.forward──▶ [StageOutput 0..S]
          ──task.evaluate(outputs, batch, "val")──▶ per stage s: task.predict(outputs[s], batch)
                                                    ├─ task.update(...) with task.ground_truth(target)
                                                    └─ last stage's predictions ▶ overlays
    epoch end ──task.compute("val")──▶ {"val/pq": ..., "val/pq_s1": ...} ──KNetModule.log_dict
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from knet_lightning.models.outputs import StageOutput
from knet_lightning.tasks.settings import TaskSettings

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


class SegmentationTask(nn.Module, ABC):
    """Post-processing, ground truth, metrics, overlay and writer of one task.

    An ``nn.Module`` so that its metrics (torchmetrics, synced across processes in
    ``compute``) follow the LightningModule to its device; metric states are not persistent,
    so the task adds nothing to a checkpoint.

    Args:
        num_classes: classes the network predicts (contiguous ids, things first).
        num_things: thing classes among them (0 for the semantic task).
        num_proposals: instance kernels; kernel ``num_proposals + k`` is stuff class
            ``num_things + k`` (panoptic).
        num_stages: kernel update stages S; outputs are stages 0..S.
        eval_all_stages: evaluate every stage depth at validation, not only the last.
        settings: the task's post-processing settings (its :attr:`settings_cls`, or a mapping).
    """

    name: ClassVar[str]
    settings_cls: ClassVar[type[TaskSettings]]
    # the first stage with a prediction of its own (stage 0 has no classifier in the
    # detection heads; the semantic decode head's logits are a prediction)
    first_eval_stage: ClassVar[int] = 1
    # the metric a validation reports for each stage depth, logged as val/<name>_s<k>
    stage_metric: ClassVar[str]
    # the network reads every image at its own size, never padded to the batch's: the
    # reference's inference (MMSegmentation's whole-image ``EncoderDecoder.inference``)
    unpadded_inference: ClassVar[bool] = False
    # sliding-window and multi-scale + flip inference (knet_lightning.inference.test_time) apply: the
    # prediction is a per-pixel class map whose logits can be merged over windows and views
    test_time_strategies: ClassVar[bool] = False

    def __init__(
        self,
        num_classes: int,
        num_things: int,
        num_proposals: int,
        num_stages: int,
        eval_all_stages: bool = True,
        settings: TaskSettings | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.check_model_counts(num_stages, num_proposals)
        self.num_classes = int(num_classes)
        self.num_things = int(num_things)
        self.num_proposals = int(num_proposals)
        self.num_stages = int(num_stages)
        if isinstance(settings, self.settings_cls):
            self.settings = settings
        elif isinstance(settings, TaskSettings):
            raise TypeError(f"{self.name} task: expected {self.settings_cls.__name__}, got {type(settings).__name__}")
        else:
            self.settings = self.settings_cls.from_config(settings)
        last = self.num_stages
        self.eval_stages = list(range(self.first_eval_stage, last + 1)) if eval_all_stages else [last]

    @classmethod
    def check_model_counts(cls, num_stages: Any, num_proposals: Any = None) -> None:
        """Refuses a stage or kernel count this task cannot evaluate, naming the key: with
        ``model.num_stages`` below :attr:`first_eval_stage` training would run and then the first
        evaluation would fail, or find no stage to score. The CLI calls this before it reads any
        data; every network built for the task is checked again here. ``num_proposals=None``: not
        known yet (the semantic model's count is the data set's class count)."""
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < cls.first_eval_stage:
            why = (
                "0 is the decode head alone, without kernel updates"
                if cls.first_eval_stage == 0
                else f"stage 0 has no classifier, so the {cls.name} task predicts from the kernel update stages"
            )
            raise ValueError(
                f"model.num_stages={num_stages!r}: expected an integer >= {cls.first_eval_stage} ({why}); "
                "K-Net's paper uses 3"
            )
        if num_proposals is not None and (
            isinstance(num_proposals, bool) or not isinstance(num_proposals, int) or num_proposals < 1
        ):
            raise ValueError(
                f"model.num_proposals={num_proposals!r}: expected an integer >= 1 (the number of kernels, each "
                "one predicted segment); K-Net's paper uses 100"
            )

    def check_training_set(self, dataset: Any) -> None:
        """Warns when ``num_proposals`` is below the most thing segments in one training image:
        those images cannot have every instance matched to a kernel."""
        count = getattr(dataset, "max_things_per_image", None)
        if self.num_things == 0 or count is None:
            return
        most = int(count())
        if most > self.num_proposals:
            log.warning(
                "model.num_proposals=%d is below the largest number of thing segments in one training image "
                "(%d): some instances of such images can never be matched to a kernel; consider "
                "model.num_proposals>=%d",
                self.num_proposals,
                most,
                most,
            )

    # ------------------------------------------------------------------ prediction
    @abstractmethod
    def postprocess(
        self, stage: StageOutput, b: int, image_size: tuple[int, int], padded_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> Any:  # fmt: skip
        """Image ``b``'s prediction from one stage's outputs, at ``output_size``."""

    def network_batches(self, batch: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The batches the network runs on for ``batch``, in image order: ``batch`` itself, or,
        with :attr:`unpadded_inference` and a batch the collate function padded, one batch per
        image holding it at its own (unpadded) size, so that padding never reaches the logits."""
        images = batch["images"]
        sizes = [tuple(int(v) for v in size) for size in batch["image_sizes"]]
        if not self.unpadded_inference or all(size == tuple(images.shape[-2:]) for size in sizes):
            return [batch]
        parts = []
        for b, (h, w) in enumerate(sizes):
            part = dict(batch)
            part.update(images=images[b : b + 1, :, :h, :w].contiguous(), image_sizes=[(h, w)],
                        targets=batch["targets"][b : b + 1])  # fmt: skip
            parts.append(part)
        return parts

    def predict(self, stage: StageOutput, batch: Mapping[str, Any]) -> list[Any]:
        """Every image's prediction from one stage's outputs, at its original size."""
        padded = tuple(batch["images"].shape[-2:])
        return [
            self.postprocess(
                stage, b, tuple(batch["image_sizes"][b]), padded, tuple(int(s) for s in target["orig_size"])
            )
            for b, target in enumerate(batch["targets"])
        ]

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def ground_truth(self, target: Mapping[str, Any]) -> Any:
        """The target's ground truth at original size, in the form :meth:`update` compares."""

    @abstractmethod
    def update(
        self, split: str, stage: int, preds: list[Any], gts: list[Any], targets: Sequence[Mapping[str, Any]]
    ) -> None:
        """Adds one stage's predictions of a batch to ``split``'s metrics."""

    @abstractmethod
    def compute(self, split: str) -> dict[str, Tensor]:
        """``split``'s metrics as ``{"<split>/<name>": value}``; resets them."""

    def stages(self, split: str) -> list[int]:
        """The stage depths evaluated on ``split``: the test reports the last stage only."""
        return self.eval_stages if split == "val" else [self.num_stages]

    def evaluate(self, outputs: Sequence[StageOutput], batch: Mapping[str, Any], split: str) -> list[Any]:
        """Updates ``split``'s metrics with every evaluated stage; returns the last stage's predictions."""
        if split not in SPLITS:
            raise ValueError(f"evaluate: split must be one of {SPLITS}, got {split!r}")
        targets = batch["targets"]
        gts = [self.ground_truth(t) for t in targets]
        preds: list[Any] = []
        for s in self.stages(split):
            preds = self.predict(outputs[s], batch)
            self.update(split, s, preds, gts, targets)
        return preds

    # ------------------------------------------------------------------ presentation
    @abstractmethod
    def overlay(self, image: Tensor, prediction: Any, colors: Sequence[Sequence[int]]) -> Tensor:
        """uint8 ``(3, H, W)``: ``image`` (uint8 ``(3, H, W)``) with the prediction drawn on it."""

    @abstractmethod
    def class_map(self, prediction: Any) -> Tensor:
        """``(H, W)`` int64 class map of a prediction, 0 = nothing, class c = c + 1 (W&B masks)."""

    @abstractmethod
    def open_writer(self, out_dir: Path, class_info: Any, suffix: str = "", keep_folders: bool = False) -> Any:
        """The official-format writer of this task under ``out_dir``; ``suffix`` goes into the
        JSON file name, so that several processes can write side by side; with ``keep_folders``
        a file name's folders are kept in the output PNG's path (else its stem names it)."""

    @abstractmethod
    def write(self, writer: Any, image_id: Any, file_name: str, prediction: Any) -> None:
        """Adds one image's prediction to a writer from :meth:`open_writer`."""

    # ------------------------------------------------------------------ the Python API (Segmenter)
    @abstractmethod
    def describe(self, prediction: Any, class_names: Sequence[str], isthing: Sequence[bool]) -> dict[str, Any]:
        """The typed view of one prediction: ``segments`` (a list of
        :class:`~knet_lightning.postprocess.results.Segment`) and this task's map field (``panoptic`` and
        ``semantic``, ``instances`` or ``semantic``), on the CPU."""

    @abstractmethod
    def coco_output(self, result: Any, image_id: Any, stem: str) -> Any:
        """One :class:`~knet_lightning.postprocess.results.SegmentationResult` in this task's official format."""
