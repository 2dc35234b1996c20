"""Inputs and outputs of ``mode=predict``: a folder (or file) of images in, panoptic PNG +
JSON (COCO panoptic format), semantic PNGs or instance JSON and overlays out."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from knet_lightning.data.coco import id2rgb
from knet_lightning.data.meta import ClassInfo, DatasetError
from knet_lightning.data.transforms import collate_batch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderDataset(Dataset):
    """Images of a folder (sorted by name) or one image file, for prediction.

    Returns ``(image, target)`` like the readers, with a target that only carries
    ``file_name``, ``image_id`` and ``orig_size``.
    """

    def __init__(self, inputs: str | Path, transforms: Optional[Callable] = None) -> None:
        path = Path(inputs)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DatasetError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise DatasetError(f"inputs={inputs}: no such image file or folder")
        self.files = files
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetError(f"{path}: cannot decode image ({err})") from err
        image = tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))
        target: dict[str, Any] = {
            "file_name": path.name,
            "image_id": index,
            "orig_size": (int(array.shape[0]), int(array.shape[1])),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def folder_dataloader(inputs: str | Path, datamodule: Any) -> DataLoader:
    """A loader over ``inputs`` with the data module's evaluation transforms and batching."""
    dataset = ImageFolderDataset(inputs, transforms=datamodule.eval_transforms)
    return DataLoader(
        dataset,
        batch_size=datamodule.val_batch_size,
        shuffle=False,
        num_workers=datamodule.num_workers,
        collate_fn=partial(collate_batch, size_divisor=datamodule.size_divisor),
    )


def write_predictions(
    batches: list[list[dict[str, Any]]], out_dir: Path, class_info: ClassInfo, task: str
) -> int:
    """Writes predictions in the official formats; returns how many images were written.

    panoptic: ``out_dir/panoptic/<stem>.png`` (RGB-encoded ids) + ``out_dir/panoptic.json`` with
    COCO ``annotations`` (category ids of the data set); semantic: ``out_dir/semantic/<stem>.png``
    (contiguous ids, 255 void); instance: ``out_dir/instances.json`` (COCO results with RLE).
    """
    from pycocotools import mask as mask_utils

    out_dir.mkdir(parents=True, exist_ok=True)
    annotations: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    count = 0
    for batch in batches:
        for item in batch:
            stem = Path(str(item["file_name"])).stem
            pred = item["prediction"]
            count += 1
            if task == "panoptic":
                seg, segments = pred
                png_dir = out_dir / "panoptic"
                png_dir.mkdir(exist_ok=True)
                Image.fromarray(id2rgb(seg.cpu().numpy())).save(png_dir / f"{stem}.png")
                annotations.append(
                    {
                        "image_id": item["image_id"],
                        "file_name": f"{stem}.png",
                        "segments_info": [
                            {
                                "id": int(s["id"]),
                                "category_id": class_info.dataset_id(int(s["category_id"])),
                                "isthing": bool(s.get("isthing", class_info.isthing[int(s["category_id"])])),
                                "score": float(s.get("score", 1.0)),
                            }
                            for s in segments
                        ],
                    }
                )
            elif task == "semantic":
                sem_dir = out_dir / "semantic"
                sem_dir.mkdir(exist_ok=True)
                Image.fromarray(pred.cpu().numpy().astype(np.uint8)).save(sem_dir / f"{stem}.png")
            else:
                masks = pred["masks"].cpu().numpy()
                for k in range(masks.shape[0]):
                    rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    results.append(
                        {
                            "image_id": item["image_id"],
                            "category_id": class_info.dataset_id(int(pred["labels"][k])),
                            "segmentation": rle,
                            "score": float(pred["scores"][k]),
                        }
                    )
    if task == "panoptic":
        (out_dir / "panoptic.json").write_text(json.dumps({"annotations": annotations}, indent=1))
    elif task == "instance":
        (out_dir / "instances.json").write_text(json.dumps(results))
    return count
