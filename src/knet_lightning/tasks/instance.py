"""The instance task: the top-k (kernel, class) pairs of the last stage, no NMS, scored by COCO
mask AP."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from knet_lightning.evaluation.export import COCOResultsWriter
from knet_lightning.evaluation.instance import MaskAP, encode_masks
from knet_lightning.models.outputs import StageOutput
from knet_lightning.postprocess.merge import instance_inference
from knet_lightning.postprocess.results import Segment
from knet_lightning.postprocess.visualize import overlay_instances
from knet_lightning.tasks.base import SPLITS, SegmentationTask
from knet_lightning.tasks.settings import InstanceSettings

AP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
# instances drawn on an overlay: the score threshold of the official demo (``show_result``)
OVERLAY_SCORE_THR = 0.3


class InstanceTask(SegmentationTask):
    name = "instance"
    settings_cls = InstanceSettings
    stage_metric = "map"
    settings: InstanceSettings

    def __init__(self, *args: Any, class_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = list(class_names) if class_names is not None else None
        self.mask_ap = nn.ModuleDict({split: MaskAP(self.num_classes, class_names=names) for split in SPLITS})

    def stages(self, split: str) -> list[int]:
        # COCO evaluation of every depth would cost a COCOeval each; the last stage only
        return [self.num_stages]

    def postprocess(
        self, stage: StageOutput, b: int, image_size: tuple[int, int], padded_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> dict[str, Tensor]:  # fmt: skip
        return instance_inference(
            stage.mask_logits[b],
            stage.cls_logits[b],
            image_size=image_size,
            padded_size=padded_size,
            output_size=output_size,
            max_per_img=self.settings.max_per_img,
            mask_thr=self.settings.mask_thr,
        )

    def ground_truth(self, target: Mapping[str, Any]) -> dict[str, Any]:
        """Instance ground truth at original size as RLEs: the reader's ``eval_gt``, or the thing
        segments of a panoptic reader's ``panoptic`` map."""
        if "eval_gt" in target:
            return target["eval_gt"]
        if "panoptic" not in target:
            raise KeyError(
                f"{target.get('file_name', '?')}: instance evaluation needs target['eval_gt'] or target['panoptic']"
            )
        seg = target["panoptic"]
        labels = target["labels"].to(torch.int64)
        keep = (labels < self.num_things).nonzero().flatten()
        masks = seg.unsqueeze(0) == (keep + 1).to(seg.dtype).view(-1, 1, 1)
        return {
            "rles": encode_masks(masks),
            "labels": labels[keep],
            "iscrowd": target["iscrowd"][keep].to(torch.bool),
            "area": masks.flatten(1).sum(1).to(torch.float64),
        }

    def update(
        self, split: str, stage: int, preds: list[dict[str, Tensor]], gts: list[dict[str, Any]],
        targets: Sequence[Mapping[str, Any]],
    ) -> None:  # fmt: skip
        self.mask_ap[split].update(
            preds,
            gts,
            image_ids=[t.get("image_id", -1) for t in targets],
            image_sizes=[tuple(int(v) for v in t["orig_size"]) for t in targets],
        )

    def compute(self, split: str) -> dict[str, Tensor]:
        values = self.mask_ap[split].compute()
        self.mask_ap[split].reset()
        return {f"{split}/{k}": values[k] for k in AP_KEYS}

    def _shown(self, prediction: Mapping[str, Tensor]) -> Tensor:
        return prediction["scores"] >= OVERLAY_SCORE_THR

    def overlay(self, image: Tensor, prediction: Mapping[str, Tensor], colors: Sequence[Sequence[int]]) -> Tensor:
        keep = self._shown(prediction)
        return overlay_instances(image, prediction["masks"][keep], prediction["labels"][keep], colors)

    def class_map(self, prediction: Mapping[str, Tensor]) -> Tensor:
        keep = self._shown(prediction)
        masks, labels = prediction["masks"][keep], prediction["labels"][keep].to(torch.int64)
        if masks.shape[0] == 0:
            return torch.zeros(masks.shape[1:], dtype=torch.int64)
        # the highest-scoring mask at each pixel, as the overlay draws it
        first = masks.to(torch.uint8).argmax(0)
        return torch.where(masks.any(0), labels[first] + 1, torch.zeros_like(first))

    def open_writer(
        self, out_dir: Path, class_info: Any, suffix: str = "", keep_folders: bool = False
    ) -> COCOResultsWriter:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return COCOResultsWriter(Path(out_dir) / f"instances{suffix}.json", class_info)

    def write(self, writer: COCOResultsWriter, image_id: Any, file_name: str, prediction: Mapping[str, Tensor]) -> None:
        writer.add(image_id, prediction["masks"], prediction["scores"], prediction["labels"])

    def describe(
        self, prediction: Mapping[str, Tensor], class_names: Sequence[str], isthing: Sequence[bool]
    ) -> dict[str, Any]:
        inst = {k: v.cpu() for k, v in prediction.items()}
        segments = [
            Segment(k + 1, int(c), class_names[int(c)], float(s), int(m.sum()), True)
            for k, (m, c, s) in enumerate(zip(inst["masks"], inst["labels"], inst["scores"]))
        ]
        return {"segments": segments, "instances": inst}

    def coco_output(self, result: Any, image_id: Any, stem: str) -> list[dict[str, Any]]:
        """COCO results entries: ``image_id``, ``category_id``, RLE ``segmentation``, ``bbox``, ``score``."""
        from pycocotools import mask as mask_utils

        inst = result.instances
        rles = encode_masks(inst["masks"].numpy())
        boxes = mask_utils.toBbox(rles).tolist() if rles else []
        return [
            {
                "image_id": image_id,
                "category_id": result.dataset_ids[int(c)],
                "segmentation": rle,
                "bbox": box,
                "score": float(s),
            }  # fmt: skip
            for rle, box, c, s in zip(rles, boxes, inst["labels"], inst["scores"])
        ]
