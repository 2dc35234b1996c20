"""``mode=predict``: a :class:`~knet_lightning.Segmenter` over many images, written to disk.

``inputs=`` names the images: one file, a folder (searched recursively), a glob pattern
(``photos/**/*.jpg``) or a text file listing one path per line (relative to the list's
folder; blank lines and ``#`` comments are skipped). Each image gets its task's official
output (COCO panoptic PNG + ``panoptic.json``, COCO results ``instances.json``, label PNGs
under ``semantic/``, exactly what ``mode=eval export_predictions=true`` writes) and an overlay
with a legend under ``overlays/``. Outputs mirror the inputs' folders (``a/b/x.jpg`` gives
``panoptic/a/b/x.png``), so two inputs differing only in suffix are an error before
anything is written. An unreadable image, or one whose name leaves no output name (``.jpg``,
``..jpg``), is reported by name and skipped; the run goes on. The
summary (images done, skipped with reasons, seconds per image) is logged and written to
``summary.json``, with the ``images`` table (``id``, ``file_name``, ``height``, ``width``)
that maps the image ids of ``instances.json`` back to files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from knet_lightning.data.meta import ClassInfo, DatasetError
from knet_lightning.postprocess.results import SegmentationResult, SkippedInput

__all__ = ["IMAGE_SUFFIXES", "PredictInput", "PredictSummary", "collect_inputs", "predict_to_folder"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class PredictInput:
    """One image to predict: its ``path`` and the ``name`` its outputs are written under
    (relative to the input folder, the glob's root or the list's common folder)."""

    path: Path
    name: str


@dataclass
class PredictSummary:
    """What a predict run did."""

    done: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.done if self.done else 0.0

    def lines(self) -> list[str]:
        """The summary as log lines."""
        out = [f"predicted {self.done} image(s) in {self.seconds:.1f} s ({self.seconds_per_image:.3f} s/image), "
               f"skipped {len(self.skipped)}"]  # fmt: skip
        out += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return out


def _is_image(path: Path) -> bool:
    """A file with an image suffix; a file named only a suffix (``.jpg``, which Python reads as a
    hidden file without one) too, so that it is reported as skipped rather than passed over."""
    return path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or path.name.lower() in IMAGE_SUFFIXES)


def output_problem(name: str) -> str | None:
    """Why no output file can be named after the input ``name`` (None: one can). Outputs are named
    by the input's path without its suffix plus ``.png``; a name that is only a suffix (``.jpg``) or
    whose stem is only dots (``..jpg``) would give ``..png`` and the like, which the image writers
    cannot tell a format from (and ``.``/``..`` are not file names), so such an input is skipped."""
    path = Path(name)
    stem = path.stem if path.suffix else ""
    if stem.strip("."):
        return None
    what = "is only a suffix" if not stem else f"without its suffix is only dots ({stem!r})"
    return f"its name {what}: no output file can be named after it (outputs are <path without suffix>.png); rename it"


def _relative_to_common(paths: list[Path]) -> list[PredictInput]:
    if not paths:
        return []
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return [PredictInput(p, p.resolve().relative_to(root).as_posix()) for p in paths]


def _from_list(listing: Path) -> list[Path]:
    paths = []
    for line in listing.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        paths.append(path if path.is_absolute() else listing.parent / path)
    if not paths:
        raise DatasetError(f"inputs={listing}: the list names no image (one path per line)")
    return paths


def collect_inputs(inputs: str | Path) -> list[PredictInput]:
    """The images ``inputs`` names, sorted by name within a folder or glob, in order for a list.

    Raises:
        DatasetError: nothing found, or two inputs whose outputs would share a file.
    """
    text = str(inputs)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_image(p))
        if not files:
            raise DatasetError(f"inputs={inputs}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
        items = [PredictInput(p, p.relative_to(path).as_posix()) for p in files]
    elif path.is_file() and path.suffix.lower() == ".txt":
        # listed files that do not exist are kept: they are reported as skipped, by name
        items = _relative_to_common(_from_list(path))
    elif path.is_file():
        items = [PredictInput(path, path.name)]
    elif _GLOB_CHARS & set(text):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if _is_image(Path(p)))
        if not files:
            raise DatasetError(f"inputs={inputs}: the pattern matches no image ({', '.join(IMAGE_SUFFIXES)})")
        items = _relative_to_common(files)
    else:
        raise DatasetError(f"inputs={inputs}: no such image file, folder, glob match or .txt list")
    by_output: dict[str, list[str]] = {}
    for item in items:
        if output_problem(item.name):  # skipped when predicting: it writes nothing
            continue
        by_output.setdefault(str(Path(item.name).with_suffix("")), []).append(item.name)
    clashes = [names for names in by_output.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" and ".join(names) for names in clashes)
        raise DatasetError(
            f"inputs={inputs}: {listed} would write the same output file (outputs are named by the input's "
            "path without its suffix); rename or move one of each"
        )
    return items


def class_info_of(segmenter: Any) -> ClassInfo:
    """The :class:`ClassInfo` the official writers need, from what the checkpoint carried."""
    return ClassInfo(names=segmenter.class_names, isthing=segmenter.isthing, colors=segmenter.colors,
                     dataset_ids=segmenter.dataset_ids)  # fmt: skip


def predict_to_folder(
    segmenter: Any, inputs: list[PredictInput], out_dir: str | Path, batch_size: int = 1, overlays: bool = True
) -> PredictSummary:
    """Segment ``inputs`` in batches, streaming each image's outputs to ``out_dir``.

    The official-format JSON is written at the end (it is never left half-written: a failure
    aborts it); PNGs and overlays are written as images finish. Returns the summary, also
    written to ``out_dir/summary.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = segmenter.module.task
    writer = task.open_writer(out_dir, class_info_of(segmenter), keep_folders=True)
    summary = PredictSummary()
    start = time.perf_counter()
    try:
        for first in range(0, len(inputs), batch_size):
            chunk = inputs[first : first + batch_size]
            results = _segment(segmenter, chunk, batch_size)
            for offset, (item, result) in enumerate(zip(chunk, results)):
                if isinstance(result, SkippedInput):
                    summary.skipped.append((item.name, result.reason))
                    continue
                _write_one(task, writer, first + offset, item, result, out_dir, overlays)
                height, width = result.size
                summary.images.append({"id": first + offset, "file_name": item.name, "height": height, "width": width})
                summary.done += 1
            log.info("predict: %d / %d images", min(first + batch_size, len(inputs)), len(inputs))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    summary.seconds = time.perf_counter() - start
    record = asdict(summary) | {"seconds_per_image": summary.seconds_per_image}
    (out_dir / "summary.json").write_text(json.dumps(record, indent=2))
    return summary


def _segment(segmenter: Any, chunk: list[PredictInput], batch_size: int) -> list[Any]:
    """The Segmenter's results for ``chunk`` in its order; an input no output can be named after
    (:func:`output_problem`) is a :class:`SkippedInput` with a warning naming it, and is not read."""
    problems = [output_problem(item.name) for item in chunk]
    for item, problem in zip(chunk, problems):
        if problem:
            log.warning("skipped %s: %s", item.path, problem)
    ready = [item.path for item, problem in zip(chunk, problems) if not problem]
    results = iter(segmenter(ready, batch_size=batch_size, progress=False) if ready else [])
    return [
        SkippedInput(str(item.path), problem) if problem else next(results) for item, problem in zip(chunk, problems)
    ]


def _write_one(task: Any, writer: Any, image_id: int, item: PredictInput, result: SegmentationResult,
               out_dir: Path, overlays: bool) -> None:  # fmt: skip
    task.write(writer, image_id, item.name, result.prediction)
    if overlays:
        path = out_dir / "overlays" / Path(item.name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        result.overlay().save(path)
