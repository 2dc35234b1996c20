"""Apply a trained K-Net from Python: ``Segmenter.from_checkpoint(path)(images)``.

The checkpoint carries everything (no Hydra config): the network (``knet_model_config``), the
task, class names, thing flags and colours (``hyper_parameters``), and the data set's test-time
resize, normalisation, padding divisor and category ids (``knet_inference``), written by every
training run and by ``mode=convert``. The preprocessing and post-processing are the ones
``mode=eval`` runs (the data module's evaluation pipeline and the task object's
``predict``), so results equal the evaluated predictions.

``backend="onnxruntime"`` runs the network of an ``.onnx`` file that
:func:`~knet_lightning.inference.onnx_export.export_onnx` wrote (or of a checkpoint, exported on the fly)
in ONNX Runtime on the CPU; reading, transforms, post-processing and results are the same code.

Inputs: a path, a PIL image, a numpy ``(H, W)`` / ``(H, W, C)`` array (uint8, uint16 or
finite float in [0, 1]), a ``(3, H, W)`` / ``(H, W)`` tensor (uint8 or float in [0, 1]), or a list
of them. Files and PIL images get their EXIF orientation applied; grayscale, palette, RGBA
and 16-bit images become 8-bit RGB. An input that cannot be read (an unreadable file; an empty,
non-finite or malformed array or tensor) becomes a :class:`~knet_lightning.postprocess.results.SkippedInput`
naming it and the reason, and the rest of the batch goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from knet_lightning.checkpoint import rebuild as checkpoint_rebuild
from knet_lightning.data.io import read_rgb_image, to_rgb_array, upright
from knet_lightning.data.meta import DatasetError, default_palette
from knet_lightning.data.resize import LEGACY_BACKEND
from knet_lightning.data.transforms import build_transforms, collate_batch
from knet_lightning.inference.test_time import TestTimeSettings, run_test_time, settings_for_task
from knet_lightning.models.outputs import StageOutput
from knet_lightning.postprocess.results import SegmentationResult, SkippedInput

__all__ = ["BACKENDS", "PRECISIONS", "Segmenter", "bf16_supported", "run_device"]

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray | Tensor
PRECISIONS = ("fp32", "bf16", "auto")
# torch: the KNetModule; onnxruntime: an exported fp32 graph (knet_lightning.inference.onnx_export)
BACKENDS = ("torch", "onnxruntime")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on ``device``: CUDA, or a CPU whose oneDNN has bf16 kernels
    (AVX-512 BF16 / AMX; on AVX2-only CPUs bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def run_device(device: str, backend: str = "torch") -> str:
    """The device of ``predict.device`` / ``serve.device``: ``auto`` is CUDA when available, else
    the CPU; the ``onnxruntime`` backend runs in ONNX Runtime's CPU session whatever is asked."""
    if backend == "onnxruntime":
        return "cpu"
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _check_size(rgb: np.ndarray, what: str) -> np.ndarray:
    """``rgb`` if it has pixels: an empty image (0 rows or columns) has nothing to segment, and
    would fail inside the network or its post-processing, taking the rest of its batch along."""
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise DatasetError(f"{what}: an empty image ({rgb.shape[0]}x{rgb.shape[1]} HxW); expected at least 1x1 pixels")
    return rgb


def _array_to_rgb(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 ``(H, W, 3)`` from a numpy image: gray, gray + alpha, RGB or RGBA; uint8, uint16 or
    finite float in [0, 1] (a NaN or Inf pixel is refused, not quietly made 0: it is no colour)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise DatasetError(f"{what}: expected an (H, W) or (H, W, C) image with C in 1..4, got shape {array.shape}")
    _check_size(array, what)
    if array.dtype == np.uint16:
        array = (array.astype(np.uint32) // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            nan = int(np.isnan(array).sum())
            counts = {"NaN": nan, "Inf": array.size - int(finite.sum()) - nan}
            listed = " and ".join(f"{n} {kind}" for kind, n in counts.items() if n)
            raise DatasetError(f"{what}: a float image must hold finite values in [0, 1], got {listed} value(s)")
        if array.min() < 0 or array.max() > 1:
            raise DatasetError(f"{what}: a float image must hold values in [0, 1], got [{array.min()}, {array.max()}]")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise DatasetError(f"{what}: expected uint8, uint16 or float pixels, got {array.dtype}")
    channels = array.shape[2]
    if channels in (1, 2):  # gray (+ alpha): the alpha is dropped, as PIL's convert("RGB")
        array = np.repeat(array[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def read_input(item: ImageInput, index: int) -> tuple[np.ndarray, str | None]:
    """uint8 ``(H, W, 3)`` RGB of one input and its file name (None for in-memory inputs)."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        return read_rgb_image(path), path.name
    if isinstance(item, Image.Image):
        rgb = _check_size(to_rgb_array(upright(item)), f"input {index} (PIL image)")
        return rgb, getattr(item, "filename", None) or None
    if isinstance(item, np.ndarray):
        return _array_to_rgb(item, f"input {index} (numpy array)"), None
    if isinstance(item, Tensor):
        t = item.detach().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()  # bfloat16 and float8 have no numpy dtype; their values fit float32
        try:
            array = t.numpy()
        except (TypeError, RuntimeError) as err:  # a dtype numpy has no counterpart of (quantized, ...)
            raise DatasetError(
                f"input {index} (tensor): expected uint8, uint16 or float pixels, got {t.dtype}"
            ) from err
        return _array_to_rgb(array, f"input {index} (tensor)"), None
    raise DatasetError(
        f"input {index}: expected a path, a PIL image, a numpy array or a tensor, got {type(item).__name__}"
    )


class Segmenter:
    """A trained K-Net with its preprocessing and post-processing.

    Build it with :meth:`from_checkpoint`; call it on one image (returns one
    :class:`~knet_lightning.postprocess.results.SegmentationResult`) or a list (returns a list, with a
    :class:`~knet_lightning.postprocess.results.SkippedInput` for each unreadable one).

    Args:
        module: the :class:`~knet_lightning.module.KNetModule` with its trained weights, or an
            :class:`~knet_lightning.inference.onnx_runtime.OnnxRuntimeNetwork` (backend ``onnxruntime``).
        inference: the ``knet_inference`` settings (resize, normalisation, divisor, ids).
        device: where the network runs.
        stage: the stage whose output is read (-1: the last, as evaluation reads it).
        precision: ``"fp32"``; ``"bf16"``: the network under bf16 autocast (post-processing in
            fp32); ``"auto"`` (default): bf16 where :func:`bf16_supported`, else fp32. On the
            synthetic val split bf16 changed PQ by -0.04 (76.20 -> 76.16), within the 0.3 that
            makes it the default where the CPU has bf16 kernels
            (``scripts/bench_inference_precision.py``; README, Use a trained model). The
            ``onnxruntime`` backend runs the exported fp32 graph: ``"auto"`` is fp32 there.
        test_time: how the network is run (:class:`~knet_lightning.inference.test_time.TestTimeSettings`):
            ``None``: the module's (a checkpoint's stored ``model.test_time``), else whole image;
            a mapping: those fields on top of it, e.g. ``{"tta": True, "scales": [0.5, 1.0]}``;
            a ``TestTimeSettings``: as it is. Sliding windows and multi-scale + flip are the
            semantic task's; under ``tta`` the images are not resized before the network (the
            views are resized from the original).
    """

    def __init__(self, module: Any, inference: dict[str, Any], device: str | torch.device = "cpu",
                 stage: int = -1, precision: str = "auto",
                 test_time: Mapping[str, Any] | TestTimeSettings | None = None) -> None:  # fmt: skip
        self.backend: str = getattr(module, "backend", "torch")
        self.module = module.eval().to(device)
        self.device = torch.device(device)
        self.settings = dict(inference)
        num_outputs = module.num_stages + 1
        if not -num_outputs <= stage < num_outputs:
            raise ValueError(
                f"Segmenter: stage={stage} is outside the model's {num_outputs} outputs (0..{num_outputs - 1})"
            )
        if self.backend != "torch" and stage % num_outputs != module.stage:
            raise ValueError(f"Segmenter: stage={stage}, but the exported network holds stage {module.stage} only")
        self.stage = stage
        if precision not in PRECISIONS:
            raise ValueError(f"Segmenter: precision must be one of {PRECISIONS}, got {precision!r}")
        if self.backend != "torch":
            if precision == "bf16":
                raise ValueError(f"Segmenter: backend={self.backend!r} runs the exported fp32 network; precision "
                                 "'bf16' is for backend='torch'")  # fmt: skip
            precision = "fp32"
        if precision == "auto":
            precision = "bf16" if bf16_supported(self.device) else "fp32"
        self.precision = precision
        self.task = module.task.name
        self.class_names = list(module.class_names)
        self.isthing = list(module.isthing)
        self.colors = [tuple(c) for c in (module.colors or default_palette(len(self.class_names)))]
        self.dataset_ids = list(self.settings.get("dataset_ids") or range(1, len(self.class_names) + 1))
        # checkpoints written before the resize's arithmetic was stored were evaluated with torchvision's
        self.settings.setdefault("resize_backend", LEGACY_BACKEND)
        own = getattr(module, "test_time", None)  # an exported network has none: whole image
        base = own if isinstance(own, TestTimeSettings) else TestTimeSettings()
        if test_time is None or isinstance(test_time, TestTimeSettings):
            self.test_time = test_time or base
        else:
            self.test_time = TestTimeSettings.from_config({**base.to_dict(), **dict(test_time)})
        settings_for_task(self.test_time, module.task)  # refused where the task has no such strategy
        # multi-scale + flip resizes the original image itself
        self.transforms = build_transforms(
            False, short_edge=None if self.test_time.tta else self.settings["short_edge"],
            max_size=self.settings["max_size"],
            mean=self.settings["mean"], std=self.settings["std"], resize_backend=self.settings["resize_backend"],
        )  # fmt: skip

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        stage: int = -1,
        trusted: bool = False,
        precision: str = "auto",
        backend: str = "torch",
        test_time: Mapping[str, Any] | TestTimeSettings | None = None,
        config: Mapping[str, Any] | None = None,
        overrides: Sequence[str] = (),
    ) -> Segmenter:
        """A Segmenter from a checkpoint of a training run or of ``mode=convert``, or (backend
        ``onnxruntime``) from an ``.onnx`` file of :func:`~knet_lightning.inference.onnx_export.export_onnx`.

        Args:
            path: the ``.ckpt`` file, or an ``.onnx`` file with ``backend="onnxruntime"``.
            device: ``"cpu"``, ``"cuda"``, ... (``onnxruntime``: ``"cpu"``).
            stage: the stage output to read (-1: the last; an ``.onnx`` file: -1 or its stage).
            trusted: load with full pickle (only for files you trust); default weights-only.
            precision: ``"auto"`` (default), ``"fp32"`` or ``"bf16"`` (see the class); ``"auto"``
                runs a checkpoint of ``mode=convert`` (published weights) in fp32.
            backend: ``"torch"`` (default), or ``"onnxruntime"``: the network runs in an ONNX
                Runtime session on the CPU (a checkpoint is exported to a temporary file first).
            test_time: ``None``: the checkpoint's ``model.test_time`` (whole image if it has
                none); a mapping of fields on top of it or a ``TestTimeSettings`` (see the class).
            config / overrides: a run's resolved ``model`` config and its command line
                (``mode=predict``): what they may change of the checkpoint's model, checked before
                anything is built or exported (:func:`~knet_lightning.checkpoint.rebuild.rebuild_module`);
                None: the checkpoint's as it is.
        """
        path = Path(path)
        if backend not in BACKENDS:
            raise ValueError(f"Segmenter: backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "onnxruntime":
            from knet_lightning.inference.onnx_export import onnxruntime_network

            network = onnxruntime_network(path, stage=stage, trusted=trusted, config=config, overrides=overrides)
            return cls(network, network.inference, device=device, stage=network.stage, precision=precision,
                       test_time=test_time)  # fmt: skip
        if path.suffix.lower() == ".onnx":
            raise ValueError(f"{path} is an ONNX file: load it with backend='onnxruntime'")
        module, inference, converted = checkpoint_rebuild.rebuild_module(
            path, config=config, overrides=overrides, mode="predict", trusted=trusted
        )
        if precision == "auto" and converted:
            # published weights: their numbers were computed in fp32, and bf16 moves labels
            log.info("%s was converted from published weights: precision 'auto' runs it in fp32 (ask for "
                     "'bf16' to trade agreement for speed)", path)  # fmt: skip
            precision = "fp32"
        return cls(module, inference, device=device, stage=stage, precision=precision, test_time=test_time)

    # ------------------------------------------------------------------ running
    def __call__(
        self, inputs: ImageInput | Sequence[ImageInput], batch_size: int = 1, progress: bool | None = None
    ) -> Any:
        """Segment one image or a list of them (in batches of ``batch_size``).

        Returns one result for one input, else a list in input order; ``progress`` shows a
        progress bar (default: for more than one batch).
        """
        single = not isinstance(inputs, (list, tuple))
        items: list[ImageInput] = [inputs] if single else list(inputs)  # type: ignore[list-item]
        if batch_size < 1:
            raise ValueError(f"Segmenter: batch_size must be >= 1, got {batch_size}")
        starts = range(0, len(items), batch_size)
        if progress is None:
            progress = len(starts) > 1
        results: list[Any] = []
        for start in _track(starts, progress, len(items), batch_size):
            results += self._run_batch(items[start : start + batch_size], start)
        return results[0] if single else results

    def _run_batch(self, items: Sequence[ImageInput], offset: int) -> list[Any]:
        out: list[Any] = [None] * len(items)
        samples, slots, images = [], [], []
        for k, item in enumerate(items):
            name = str(item) if isinstance(item, (str, Path)) else f"input {offset + k}"
            try:
                rgb, file_name = read_input(item, offset + k)
            except (DatasetError, OSError, ValueError) as err:
                log.warning("skipped %s: %s", name, err)
                out[k] = SkippedInput(name, str(err))
                continue
            image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
            target = {"orig_size": rgb.shape[:2], "file_name": file_name}
            samples.append(self.transforms(tv_tensors.Image(image), target))
            slots.append(k)
            images.append((rgb, file_name))
        if not samples:
            return out
        batch = collate_batch(samples, size_divisor=int(self.settings["size_divisor"]),
                              mean=self.settings["mean"], std=self.settings["std"])  # fmt: skip
        batch["images"] = batch["images"].to(self.device)
        preds = []
        with torch.inference_mode():
            # the batch, or each image unpadded where the task reads images at their own size
            for part in self.module.task.network_batches(batch):
                if self.test_time.is_plain:
                    stage = self._network(part["images"])
                else:  # sliding windows / multi-scale + flip over the stage read (knet_lightning.inference.test_time)
                    (stage,) = run_test_time(lambda images: [self._network(images)], part, self.test_time, [0],
                                             self.settings)  # fmt: skip
                # the merge compares scores and mask probabilities: in fp32, as evaluation runs it
                stage = StageOutput(*(t.float() if isinstance(t, Tensor) else t for t in stage))
                preds += self.module.task.predict(stage, part)
        for k, pred, (rgb, file_name) in zip(slots, preds, images):
            out[k] = self._result(pred, rgb, file_name)
        return out

    def _network(self, images: Tensor) -> StageOutput:
        """The network's outputs of :attr:`stage` for the padded, normalised ``images (B, 3, H, W)``."""
        if self.backend != "torch":
            return self.module(images)  # the exported graph returns its one stage
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.module(images)[self.stage]

    def _result(self, pred: Any, rgb: np.ndarray, file_name: str | None) -> SegmentationResult:
        task = self.module.task
        pred = _to_cpu(pred)
        return SegmentationResult(
            task=self.task, image=rgb, class_names=self.class_names, isthing=self.isthing, colors=self.colors,
            dataset_ids=self.dataset_ids, source=file_name, prediction=pred, task_object=task,
            **task.describe(pred, self.class_names, self.isthing),
        )  # fmt: skip


def _to_cpu(pred: Any) -> Any:
    if isinstance(pred, Tensor):
        return pred.cpu()
    if isinstance(pred, dict):
        return {k: _to_cpu(v) for k, v in pred.items()}
    if isinstance(pred, tuple):
        return tuple(_to_cpu(v) for v in pred)
    return pred


def _track(starts: range, show: bool, total: int, batch_size: int) -> Iterable[int]:
    """``starts``, with a progress bar of the images done when ``show``."""
    if not show:
        yield from starts
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("segmenting", total=total)
        for start in starts:
            yield start
            bar.advance(task, min(batch_size, total - start))
