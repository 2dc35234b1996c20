"""The panoptic task: thing and stuff kernels merged into one segment map per image, scored by
PQ (official COCO rules) at every stage depth and by the mIoU of the segment classes (crowd
pixels counted with their class, as the references' semantic ground truth)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.data.io import id2rgb
from knet_lightning.evaluation.export import COCOPanopticWriter, segment_areas_and_boxes
from knet_lightning.evaluation.panoptic import PanopticQuality
from knet_lightning.evaluation.semantic import MeanIoU
from knet_lightning.models.outputs import StageOutput
from knet_lightning.postprocess.merge import panoptic_inference, panoptic_to_semantic
from knet_lightning.postprocess.results import Segment
from knet_lightning.postprocess.visualize import overlay_panoptic
from knet_lightning.tasks.base import SPLITS, SegmentationTask
from knet_lightning.tasks.settings import PanopticSettings

PQ_KEYS = ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st")

# a prediction: the segment-id map (H, W) and its segments {id, category_id, isthing, score, area}
PanopticPrediction = tuple[Tensor, list[dict[str, Any]]]


class PanopticTask(SegmentationTask):
    name = "panoptic"
    settings_cls = PanopticSettings
    stage_metric = "pq"
    settings: PanopticSettings

    def __init__(self, *args: Any, class_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        names = list(class_names) if class_names is not None else None
        self.pq = nn.ModuleDict(
            {
                split: nn.ModuleList(
                    PanopticQuality(self.num_classes, self.num_things, names) for _ in self.stages(split)
                )
                for split in SPLITS
            }
        )
        self.miou = nn.ModuleDict({split: MeanIoU(self.num_classes, ignore_index=IGNORE_INDEX) for split in SPLITS})

    def postprocess(
        self, stage: StageOutput, b: int, image_size: tuple[int, int], padded_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> PanopticPrediction:  # fmt: skip
        s = self.settings
        return panoptic_inference(
            stage.mask_logits[b],
            stage.cls_logits[b],
            num_things=self.num_things,
            num_proposals=self.num_proposals,
            image_size=image_size,
            padded_size=padded_size,
            output_size=output_size,
            object_mask_thr=s.object_mask_thr,
            overlap_thr=s.overlap_thr,
            mask_thr=s.mask_thr,
            method=s.method,
        )

    def ground_truth(self, target: Mapping[str, Any]) -> tuple[Tensor, list[dict[str, Any]], Tensor]:
        """The reader's segment-index map at original size (segment k has id k + 1, -1 = an id
        its JSON does not list), its segments, and the semantic map for the mIoU.

        The mIoU's map follows the references, not the training target: crowd pixels count with
        their class (the semantic ground truth of Mask2Former's
        datasets/prepare_coco_semantic_annos_from_panoptic_annos.py and of mmdet's
        ``LoadPanopticAnnotations`` write every listed segment, crowd included); void and
        unlisted pixels are ``IGNORE_INDEX``.
        """
        if "panoptic" not in target:
            raise KeyError(
                f"{target.get('file_name', '?')}: panoptic evaluation needs target['panoptic'] (the segment-index "
                "map at original size); the data set reader did not provide it"
            )
        seg = target["panoptic"]
        labels = target["labels"].to(torch.int64)
        iscrowd = target["iscrowd"].to(torch.bool)
        segments = [
            {"id": k + 1, "category_id": int(labels[k]), "iscrowd": bool(iscrowd[k])} for k in range(len(labels))
        ]
        # on the map's device: Lightning moves the targets to the GPU with the batch
        lut = torch.full((len(labels) + 1,), IGNORE_INDEX, dtype=torch.int64, device=seg.device)
        lut[1:] = labels.to(seg.device)
        sem = lut[seg.to(torch.int64).clamp_(0, len(labels))]  # -1 (unlisted) reads lut[0]
        return seg, segments, sem

    def update(
        self, split: str, stage: int, preds: list[PanopticPrediction], gts: list[Any],
        targets: Sequence[Mapping[str, Any]],
    ) -> None:  # fmt: skip
        metric = self.pq[split][self.stages(split).index(stage)]
        for (seg, segments), (gt_seg, gt_segments, gt_sem) in zip(preds, gts):
            metric.update(seg, segments, gt_seg, gt_segments)
            if stage == self.num_stages:
                self.miou[split].update(panoptic_to_semantic(seg, segments, ignore_index=IGNORE_INDEX), gt_sem)

    def compute(self, split: str) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s, metric in zip(self.stages(split), self.pq[split]):
            values = metric.compute()
            metric.reset()
            if s == self.num_stages:
                out.update({f"{split}/{k}": values[k] for k in PQ_KEYS if k in values})
            if split == "val":
                out[f"val/pq_s{s}"] = values["pq"]
        values = self.miou[split].compute()
        self.miou[split].reset()
        out[f"{split}/miou"] = values["miou"]
        out[f"{split}/acc"] = values["acc"]
        return out

    def overlay(self, image: Tensor, prediction: PanopticPrediction, colors: Sequence[Sequence[int]]) -> Tensor:
        seg, segments = prediction
        return overlay_panoptic(image, seg, segments, colors)

    def class_map(self, prediction: PanopticPrediction) -> Tensor:
        seg, segments = prediction
        sem = panoptic_to_semantic(seg, segments, ignore_index=-1)
        return sem + 1

    def open_writer(
        self, out_dir: Path, class_info: Any, suffix: str = "", keep_folders: bool = False
    ) -> COCOPanopticWriter:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return COCOPanopticWriter(
            Path(out_dir), class_info, json_name=f"panoptic{suffix}.json", keep_folders=keep_folders
        )

    def write(self, writer: COCOPanopticWriter, image_id: Any, file_name: str, prediction: PanopticPrediction) -> None:
        seg, segments = prediction
        writer.add(image_id, file_name, seg, segments)

    def describe(
        self, prediction: PanopticPrediction, class_names: Sequence[str], isthing: Sequence[bool]
    ) -> dict[str, Any]:
        seg, infos = prediction
        seg = seg.cpu()
        areas = torch.bincount(seg.flatten().long(), minlength=max((int(s["id"]) for s in infos), default=0) + 1)
        segments = [
            Segment(
                int(s["id"]),
                int(s["category_id"]),
                class_names[int(s["category_id"])],
                float(s["score"]),
                int(areas[int(s["id"])]),
                bool(isthing[int(s["category_id"])]),
            )  # fmt: skip
            for s in infos
        ]
        semantic = panoptic_to_semantic(seg, infos, ignore_index=IGNORE_INDEX).to(torch.int64)
        return {"segments": segments, "panoptic": seg, "semantic": semantic}

    def coco_output(self, result: Any, image_id: Any, stem: str) -> dict[str, Any]:
        """COCO panoptic: ``{"file_name": "<stem>.png", "segments_info": [...], "png": PIL image}``."""
        from PIL import Image

        seg = result.panoptic.numpy()
        areas, boxes = segment_areas_and_boxes(seg, [s.id for s in result.segments])
        info = [
            {
                "id": s.id,
                "category_id": result.dataset_ids[s.label],
                "area": int(a),
                "bbox": [int(v) for v in b],
                "iscrowd": 0,
                "isthing": int(s.is_thing),
                "score": s.score,
            }  # fmt: skip
            for s, a, b in zip(result.segments, areas, boxes)
            if a > 0
        ]
        return {"file_name": f"{stem}.png", "segments_info": info, "png": Image.fromarray(id2rgb(seg))}
