"""``mode=check_data``: a data set's report before training, from its own readers.

Every image of the training and validation splits is read as training reads it (without the
transforms), and the report counts images, pixels and segments per class and unlabelled pixels,
and names by file each image without annotations and each defect the reader finds (a missing or
corrupt file, an image / annotation size mismatch, an unknown category id or label value). A
defect in a split's annotation file itself (say an unknown category id in a COCO JSON) stops
that split's reading and is reported as one problem. The report is printed, written as
``data_check.json`` with a per-class histogram ``class_histogram.png``, and a run with a defect
ends with an error (a non-zero exit).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.data.meta import ClassInfo, DatasetError

__all__ = ["SplitReport", "check_split", "write_report"]


@dataclass
class SplitReport:
    """What one split holds.

    Attributes:
        split: the role (``train``, ``val``).
        images: samples read (with or without a defect).
        pixels: per class, the pixels its segments cover.
        segments: per class, the segments (instances, or one region per image and stuff class).
        unlabeled_pixels: pixels of no class (void / ignore).
        total_pixels: pixels of all images read.
        empty: files with no annotated segment.
        problems: ``(file, message)`` of every defect; ``file`` is ``"-"`` for the split's own files.
    """

    split: str
    images: int = 0
    pixels: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    unlabeled_pixels: int = 0
    total_pixels: int = 0
    empty: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _file_of(dataset: Any, index: int) -> str:
    info = getattr(dataset, "image_info", None)
    return str(info(index).get("file_name", index)) if info is not None else str(index)


def check_split(split: str, make_dataset: Any, num_classes: int) -> SplitReport:
    """Reads every sample of ``make_dataset()`` (a reader without transforms) into a :class:`SplitReport`."""
    report = SplitReport(split, pixels=[0] * num_classes, segments=[0] * num_classes)
    try:
        dataset = make_dataset()
    except DatasetError as error:
        report.problems.append(("-", str(error)))
        return report
    for index in range(len(dataset)):
        report.images += 1
        try:
            _, target = dataset[index]
        except DatasetError as error:
            report.problems.append((_file_of(dataset, index), str(error)))
            continue
        name = str(target.get("file_name", _file_of(dataset, index)))
        masks = torch.as_tensor(target["masks"]).bool()
        labels = torch.as_tensor(target["labels"]).long()
        height, width = masks.shape[-2:]
        report.total_pixels += int(height * width)
        if "sem_seg" in target:
            report.unlabeled_pixels += int((torch.as_tensor(target["sem_seg"]) == IGNORE_INDEX).sum())
        else:
            report.unlabeled_pixels += (
                int(height * width - int(masks.any(dim=0).sum())) if len(masks) else height * width
            )
        if len(labels) == 0:
            report.empty.append(name)
        areas = masks.flatten(1).sum(dim=1).tolist() if len(masks) else []
        for label, area in zip(labels.tolist(), areas):
            if 0 <= label < num_classes:
                report.pixels[label] += int(area)
                report.segments[label] += 1
    return report


def _histogram(class_info: ClassInfo, reports: Sequence[SplitReport], path: Path) -> None:
    """A bar per class: its share of the labelled pixels, one bar per split, in the class colour."""
    from PIL import Image, ImageDraw

    names = list(class_info.names)
    bar, gap, label_w, width = 12, 6, 180, 420
    height = 30 + len(names) * (bar * len(reports) + gap)
    image = Image.new("RGB", (label_w + width + 80, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 6), "share of labelled pixels per class: " + ", ".join(r.split for r in reports), fill="black")
    y = 30
    for c, name in enumerate(names):
        draw.text((4, y), name[:28], fill="black")
        for k, report in enumerate(reports):
            total = max(1, sum(report.pixels))
            share = report.pixels[c] / total
            colour = tuple(class_info.colors[c]) if k == 0 else tuple(v // 2 + 64 for v in class_info.colors[c])
            draw.rectangle(
                [label_w, y, label_w + max(1, int(share * width)), y + bar - 2], fill=colour, outline="black"
            )
            draw.text((label_w + int(share * width) + 4, y), f"{100 * share:.1f}% {report.split}", fill="black")
            y += bar
        y += gap
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_report(class_info: ClassInfo, reports: Sequence[SplitReport], out_dir: Path) -> dict[str, Any]:
    """``data_check.json`` and ``class_histogram.png`` under ``out_dir``; returns the JSON's content."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "classes": [
            {"id": int(class_info.dataset_ids[c]), "name": name, "isthing": bool(class_info.isthing[c])}
            for c, name in enumerate(class_info.names)
        ],  # fmt: skip
        "splits": [asdict(r) for r in reports],
        "problems": sum(len(r.problems) for r in reports),
    }
    (out_dir / "data_check.json").write_text(json.dumps(record, indent=2))
    _histogram(class_info, reports, out_dir / "class_histogram.png")
    return record


def summary_lines(class_info: ClassInfo, reports: Sequence[SplitReport]) -> list[str]:
    """The report as lines: per split, counts and problems; per class, pixels and segments."""
    lines = []
    for r in reports:
        share = 100 * r.unlabeled_pixels / max(1, r.total_pixels)
        lines.append(f"{r.split}: {r.images} images, {sum(r.segments)} segments, {r.unlabeled_pixels} unlabelled "
                     f"pixels ({share:.1f} %), {len(r.empty)} without annotations, {len(r.problems)} problem(s)")  # fmt: skip
        lines += [f"  without annotations: {name}" for name in r.empty[:20]]
        lines += [f"  problem: {name}: {message}" for name, message in r.problems]
    width = max(len(n) for n in class_info.names)
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{r.split + ' pixels':>14} {r.split + ' segments':>14}"
                                                       for r in reports))  # fmt: skip
    for c, name in enumerate(class_info.names):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{r.pixels[c]:>14} {r.segments[c]:>14}" for r in reports))
    missing = [
        n for c, n in enumerate(class_info.names) if all(r.segments[c] == 0 for r in reports if r.split == "train")
    ]
    if missing:
        lines.append(f"classes with no training segment: {', '.join(missing)}")
    return lines
