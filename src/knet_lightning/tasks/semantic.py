"""The semantic task: a per-pixel argmax of the class kernels' masks, scored by mIoU at every
stage depth (stage 0 is the decode head's own prediction)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.evaluation.export import SemanticPNGWriter
from knet_lightning.evaluation.semantic import MeanIoU
from knet_lightning.models.outputs import StageOutput
from knet_lightning.postprocess.merge import semantic_inference
from knet_lightning.postprocess.results import Segment
from knet_lightning.postprocess.visualize import overlay_semantic
from knet_lightning.tasks.base import SPLITS, SegmentationTask
from knet_lightning.tasks.settings import SemanticSettings


class SemanticTask(SegmentationTask):
    name = "semantic"
    settings_cls = SemanticSettings
    stage_metric = "miou"
    first_eval_stage = 0
    # MMSegmentation evaluates each image unpadded (batch 1, no size divisor at test time)
    unpadded_inference = True
    # MMSegmentation's slide inference and SegTTAModel (knet_lightning.inference.test_time)
    test_time_strategies = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("class_names", None)
        super().__init__(*args, **kwargs)
        self.miou = nn.ModuleDict(
            {
                split: nn.ModuleList(MeanIoU(self.num_classes, ignore_index=IGNORE_INDEX) for _ in self.stages(split))
                for split in SPLITS
            }
        )

    def postprocess(
        self, stage: StageOutput, b: int, image_size: tuple[int, int], padded_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> Tensor:  # fmt: skip
        return semantic_inference(stage.mask_logits[b], image_size=image_size, padded_size=padded_size,
                                  output_size=output_size)  # fmt: skip

    def ground_truth(self, target: Mapping[str, Any]) -> Tensor:
        """The label map at original size (``sem_seg_orig``, which the transforms leave alone)."""
        if "sem_seg_orig" not in target:
            raise KeyError(
                f"{target.get('file_name', '?')}: semantic evaluation needs target['sem_seg_orig'] "
                "(the label map at original size); the data set reader did not provide it"
            )
        return target["sem_seg_orig"]

    def update(
        self, split: str, stage: int, preds: list[Tensor], gts: list[Tensor], targets: Sequence[Mapping[str, Any]]
    ) -> None:
        self.miou[split][self.stages(split).index(stage)].update(preds, gts)

    def compute(self, split: str) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s, metric in zip(self.stages(split), self.miou[split]):
            values = metric.compute()
            metric.reset()
            if s == self.num_stages:
                out[f"{split}/miou"] = values["miou"]
                out[f"{split}/acc"] = values["acc"]
            if split == "val":
                out[f"val/miou_s{s}"] = values["miou"]
        return out

    def overlay(self, image: Tensor, prediction: Tensor, colors: Sequence[Sequence[int]]) -> Tensor:
        return overlay_semantic(image, prediction, colors, ignore_index=IGNORE_INDEX)

    def class_map(self, prediction: Tensor) -> Tensor:
        pred = prediction.to(torch.int64)
        return torch.where(pred == IGNORE_INDEX, 0, pred + 1)

    def open_writer(
        self, out_dir: Path, class_info: Any, suffix: str = "", keep_folders: bool = False
    ) -> SemanticPNGWriter:
        # the data set's own ids (Cityscapes labelIds, ADE20K 1..150): what the official
        # evaluation scripts read
        id_map = [class_info.dataset_id(c) for c in range(class_info.num_classes)]
        return SemanticPNGWriter(Path(out_dir) / "semantic", id_map=id_map, keep_folders=keep_folders)

    def write(self, writer: SemanticPNGWriter, image_id: Any, file_name: str, prediction: Tensor) -> None:
        writer.add(file_name, prediction)

    def describe(self, prediction: Tensor, class_names: Sequence[str], isthing: Sequence[bool]) -> dict[str, Any]:
        sem = prediction.cpu().to(torch.int64)
        n = len(class_names)
        counts = torch.bincount(sem.flatten().clamp(max=n), minlength=n + 1)[:n]
        segments = [Segment(c + 1, c, class_names[c], None, int(counts[c]), bool(isthing[c]))
                    for c in range(n) if counts[c] > 0]  # fmt: skip
        return {"segments": segments, "semantic": sem}

    def coco_output(self, result: Any, image_id: Any, stem: str) -> dict[str, Any]:
        """``{"file_name": "<stem>.png", "png": PIL image}``: mode ``L`` of the data set's class ids
        (Cityscapes labelIds, ADE20K 1..150), void 0, as the label PNG writer writes them."""
        import numpy as np
        from PIL import Image

        lut = np.zeros(256, dtype=np.uint8)
        lut[: len(result.dataset_ids)] = np.asarray(result.dataset_ids, dtype=np.int64).clip(0, 255)
        sem = result.semantic.numpy().clip(0, 255).astype(np.uint8)
        return {"file_name": f"{stem}.png", "png": Image.fromarray(lut[sem], mode="L")}
