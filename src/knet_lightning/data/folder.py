"""Inputs of ``mode=predict``: a folder (or one file) of images, read like a data set."""

from __future__ import annotations

from functools import partial
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
    ``file_name``, ``image_id`` and ``orig_size``. Outputs are named by the input's stem, so
    two inputs with one stem (``a.jpg``, ``a.png``) are an error before anything is written.
    With ``skip_unreadable`` an image that cannot be read gives ``(None, target)`` with the
    reason in ``target["skipped"]`` (:func:`skipping_collate` drops it from the batch).
    """

    def __init__(
        self, inputs: str | Path, transforms: Optional[Callable] = None, skip_unreadable: bool = False
    ) -> None:
        path = Path(inputs)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DatasetError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise DatasetError(f"inputs={inputs}: no such image file or folder")
        by_stem: dict[str, list[str]] = {}
        for p in files:
            by_stem.setdefault(p.stem, []).append(p.name)
        clashes = {stem: names for stem, names in by_stem.items() if len(names) > 1}
        if clashes:
            listed = "; ".join(" and ".join(names) for names in clashes.values())
            raise DatasetError(
                f"inputs={inputs}: {listed} would write the same output file (outputs are named by the "
                "input's stem); rename or move one of each"
            )
        self.files = files
        self.transforms = transforms
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        path = self.files[index]
        try:
            array = read_rgb_image(path)
        except DatasetError as err:
            if not self.skip_unreadable:
                raise
            return None, {"file_name": path.name, "image_id": index, "skipped": str(err)}
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))
        target: dict[str, Any] = {
            "file_name": path.name,
            "image_id": index,
            "orig_size": (int(array.shape[0]), int(array.shape[1])),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def skipping_collate(collate: Callable[[list[Any]], dict[str, Any]], samples: list[Any]) -> dict[str, Any]:
    """``collate`` of the readable samples; ``batch["skipped"]`` lists ``(file name, reason)`` of
    the others. A batch with none readable has ``images`` None and no targets."""
    readable = [s for s in samples if s[0] is not None]
    skipped = [(t["file_name"], t["skipped"]) for image, t in samples if image is None]
    batch = collate(readable) if readable else {"images": None, "targets": []}
    batch["skipped"] = skipped
    return batch


def folder_dataloader(inputs: str | Path, datamodule: Any) -> DataLoader:
    """A loader over ``inputs`` with the data module's evaluation transforms and batching;
    unreadable images are skipped and reported (``batch["skipped"]``)."""
    dataset = ImageFolderDataset(inputs, transforms=datamodule.eval_transforms, skip_unreadable=True)
    return DataLoader(
        dataset,
        batch_size=datamodule.val_batch_size,
        shuffle=False,
        num_workers=datamodule.num_workers,
        collate_fn=partial(skipping_collate, datamodule.collate),
    )
