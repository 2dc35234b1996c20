"""Inputs of ``mode=predict``: a folder (or one file) of images, read like a data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from knet_lightning.data.io import read_rgb_image
from knet_lightning.data.meta import DatasetError

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
        array = read_rgb_image(path)
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))
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
        collate_fn=datamodule.collate,
    )
