"""Test-time strategies: how the network is run over an image at test time (``model.test_time``).

Three strategies of the semantic task, each equal to MMSegmentation 1.x's:

* ``whole`` (default): the network reads the image once (``EncoderDecoder.whole_inference``);
  the task's post-processing resizes its logits to the original size.
* ``slide``: windows of ``crop_size`` every ``stride`` (``EncoderDecoder.slide_inference``);
  each window's logits are resized to the window, summed into a canvas of the image's size and
  divided by the number of windows covering each pixel.
* ``tta`` (multi-scale + flip, with either mode): ``SegTTAModel`` fed by ADE20K's
  ``tta_pipeline``: the original uint8 image is resized by each factor of ``scales`` as mmcv's
  ``Resize(scale_factor=r, keep_ratio=True)`` does, each view is run with and (``flip``)
  without a horizontal flip, its logits are resized to the view, flipped back, resized to the
  original size and softmaxed; the class probabilities are averaged over the views.

The result of every strategy is a list of :class:`~knet_lightning.models.outputs.StageOutput`
whose ``mask_logits`` cover the network input of the batch (the canvas, or the averaged
probabilities at original size), so the task's post-processing (resize to the original size,
argmax) applies unchanged. Only the semantic task has these strategies, as in the references:
MMDetection's and the official K-Net's detection heads have no test-time augmentation
(the official ``KernelIterHead.aug_test`` raises ``NotImplementedError``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from knet_lightning.data.resize import check_backend, rescale_size, resize_image, scale_size
from knet_lightning.data.transforms import build_transforms
from knet_lightning.models.outputs import StageOutput
from knet_lightning.settings import settings_from

__all__ = [
    "ADE20K_IMG_RATIOS",
    "MODES",
    "TestTimeSettings",
    "check_supported",
    "multi_scale_flip",
    "recover_uint8_image",
    "run_test_time",
    "settings_for_task",
    "slide_inference",
    "slide_windows",
    "tta_view_size",
]

KEY = "model.test_time"
MODES = ("whole", "slide")
# MMSegmentation's ADE20K ``img_ratios`` (configs/_base_/datasets/ade20k.py, the ``tta_pipeline``)
ADE20K_IMG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

Network = Callable[[Tensor], Sequence[StageOutput]]


def _pair(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{KEY}.{name}={value!r}: expected (height, width), e.g. {KEY}.{name}=[512,512]")
    try:
        pair = (int(value[0]), int(value[1]))
    except (TypeError, ValueError):
        raise ValueError(f"{KEY}.{name}={value!r}: expected two integers (height, width)") from None
    if min(pair) <= 0 or any(float(v) != p for v, p in zip(value, pair)):
        raise ValueError(f"{KEY}.{name}={list(value)}: expected two positive integers (height, width)")
    return pair


@dataclass
class TestTimeSettings:
    """``model.test_time``: the strategy the network is run with at validation, test and predict.

    Attributes:
        mode: ``whole`` (the image at once) or ``slide`` (windows; needs ``crop_size``, ``stride``).
        crop_size: ``(h, w)`` of the sliding windows.
        stride: ``(h, w)`` steps between windows.
        tta: multi-scale (``scales``) and flip (``flip``) augmentation, probabilities averaged.
        scales: resize factors of the original image (mmcv ``Resize(scale_factor=r, keep_ratio=True)``);
            default MMSegmentation's ADE20K ``img_ratios``.
        flip: add the horizontally flipped view of each scale (tta only).
    """

    # not a test class, though its name starts with "Test" (pytest collects such classes)
    __test__: ClassVar[bool] = False

    mode: str = "whole"
    crop_size: list[int] | None = None
    stride: list[int] | None = None
    tta: bool = False
    scales: list[float] = field(default_factory=lambda: list(ADE20K_IMG_RATIOS))
    flip: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{KEY}.mode={self.mode!r}: expected one of {MODES}")
        crop, stride = _pair(self.crop_size, "crop_size"), _pair(self.stride, "stride")
        if self.mode == "slide" and (crop is None or stride is None):
            missing = [n for n, v in (("crop_size", crop), ("stride", stride)) if v is None]
            raise ValueError(f"{KEY}.mode=slide needs {' and '.join(f'{KEY}.{n}' for n in missing)}, "
                             f"e.g. {KEY}.crop_size=[512,512] {KEY}.stride=[341,341]")  # fmt: skip
        # stored as lists, as the config holds them (the settings travel in checkpoints)
        self.crop_size = None if crop is None else list(crop)
        self.stride = None if stride is None else list(stride)
        if not isinstance(self.tta, bool) or not isinstance(self.flip, bool):
            raise ValueError(f"{KEY}.tta={self.tta!r}, {KEY}.flip={self.flip!r}: expected true or false")
        if isinstance(self.scales, (str, bytes)) or not isinstance(self.scales, Sequence) or not self.scales:
            raise ValueError(f"{KEY}.scales={self.scales!r}: expected a non-empty list of factors, e.g. [0.5,1.0,1.5]")
        scales = []
        for value in self.scales:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
                raise ValueError(f"{KEY}.scales={list(self.scales)}: every factor must be a positive number")
            scales.append(float(value))
        self.scales = scales

    @classmethod
    def from_config(cls, values: TestTimeSettings | Mapping[str, Any] | None) -> TestTimeSettings:
        """The settings from a (possibly partial) mapping, or ``values`` itself; an unknown key
        is an error that names it and lists the valid ones."""
        if isinstance(values, cls):
            return values
        return settings_from(cls, values, KEY)

    @property
    def is_plain(self) -> bool:
        """Whole-image, single-scale inference: the network's own outputs, nothing added."""
        return self.mode == "whole" and not self.tta

    def describe(self) -> str:
        """One line for logs, e.g. ``multi-scale [0.5, 1.0] + flip, sliding windows 512x512 every 341x341``."""
        text = "whole image"
        if self.mode == "slide":
            (ch, cw), (sh, sw) = self.crop_size, self.stride  # type: ignore[misc]
            text = f"sliding windows {ch}x{cw} every {sh}x{sw}"
        if self.tta:
            text = f"multi-scale {self.scales}" + (" + flip" if self.flip else "") + f", {text}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_supported(settings: TestTimeSettings, task: Any) -> None:
    """Refuses a strategy other than whole-image single-scale for a task without them (the task
    object's ``test_time_strategies``): only the semantic task has them, as in MMSegmentation."""
    if settings.is_plain or getattr(task, "test_time_strategies", False):
        return
    raise ValueError(
        f"{KEY}: {settings.describe()} is not available for the {task.name} task: only the semantic task has "
        "sliding-window and multi-scale + flip inference (as MMSegmentation; the official K-Net and MMDetection "
        f"detection heads have no test-time augmentation). Drop the {KEY}.* overrides (mode=whole, tta=false)"
    )


def settings_for_task(values: TestTimeSettings | Mapping[str, Any] | None, task: Any) -> TestTimeSettings:
    """The settings of ``values`` (:meth:`TestTimeSettings.from_config`), checked against ``task``
    (:func:`check_supported`)."""
    settings = TestTimeSettings.from_config(values)
    check_supported(settings, task)
    return settings


# --------------------------------------------------------------------------- sliding window


def slide_windows(
    height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """The windows ``(y1, y2, x1, x2)`` of ``slide_inference`` over an ``height x width`` image,
    rows outer, as MMSegmentation places them.

    ``max(H - crop + stride - 1, 0) // stride + 1`` windows per axis, one every ``stride``; a
    window running past the image is moved back to end at its border (so the last two may
    overlap more), and one longer than the image is cut to it (an image smaller than the crop
    is read whole, unpadded).
    """
    (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * h_stride + h_crop, height), min(w_idx * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def _resize(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear ``(B, C, h, w)`` -> ``(B, C, *size)`` (align_corners=False, MMSegmentation's
    ``resize``); the same size is returned as it is (which bilinear would give exactly)."""
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def slide_inference(network: Network, images: Tensor, crop_size: Sequence[int], stride: Sequence[int],
                    stages: Sequence[int]) -> list[Tensor]:  # fmt: skip
    """Sliding-window logits of every stage in ``stages`` (MMSegmentation's ``slide_inference``).

    Args:
        network: ``network(images (B, 3, h, w)) -> [StageOutput 0..S]``, normalised input.
        images: ``(B, 3, H, W)`` normalised images of one size (unpadded).
        crop_size, stride: ``(h, w)`` of the windows and of the steps between them.
        stages: indices into the network's outputs.

    Returns:
        one float32 ``(B, C, H, W)`` canvas per entry of ``stages``: each window's logits resized
        bilinearly to the window, summed, divided by the windows covering the pixel.
    """
    batch, _, height, width = images.shape
    canvases: list[Tensor | None] = [None] * len(stages)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(height, width, crop_size, stride):
        outputs = network(images[:, :, y1:y2, x1:x2])
        for k, s in enumerate(stages):
            logits = _resize(outputs[s].mask_logits.float(), (y2 - y1, x2 - x1))
            if canvases[k] is None:  # the class count is known once the network has answered
                canvases[k] = logits.new_zeros((batch, logits.shape[1], height, width))
            canvases[k][:, :, y1:y2, x1:x2] += logits  # type: ignore[index]
        count[:, :, y1:y2, x1:x2] += 1
    # every pixel lies in a window: the last one per axis ends at the border
    return [canvas / count for canvas in canvases]  # type: ignore[operator]


def _logits_at_input(
    network: Network, images: Tensor, settings: TestTimeSettings, stages: Sequence[int]
) -> list[Tensor]:
    """Float32 ``(B, C, H, W)`` logits at the size of ``images`` (B, 3, H, W), per stage in
    ``stages``: the whole image (resized to the input, as the decode head's ``predict_by_feat``
    does) or the sliding-window canvas."""
    if settings.mode == "slide":
        return slide_inference(network, images, settings.crop_size, settings.stride, stages)  # type: ignore[arg-type]
    outputs = network(images)
    return [_resize(outputs[s].mask_logits.float(), images.shape[-2:]) for s in stages]


# --------------------------------------------------------------------------- multi-scale + flip


def tta_view_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """``(h, w)`` of the view of factor ``factor``: mmcv's ``Resize(scale_factor=r, keep_ratio=True)``
    scales the size (rounding half up) and then rescales the image to fit that scale, which can
    differ from the scaled size by a pixel."""
    return rescale_size(height, width, scale_size(height, width, factor))


def recover_uint8_image(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The uint8 ``(3, H, W)`` image a normalised float ``(3, H, W)`` one came from:
    ``round((x * std + mean) * 255)``. Exact: float32 keeps the grey level to ~1e-5."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=image.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return ((image.float() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def multi_scale_flip(network: Network, image: Tensor, settings: TestTimeSettings, mean: Sequence[float],
                     std: Sequence[float], stages: Sequence[int], device: torch.device | str,
                     resize_backend: str = "cv2") -> list[Tensor]:  # fmt: skip
    """Class probabilities averaged over scales and flips (MMSegmentation's ``SegTTAModel``).

    Args:
        network: ``network(images (1, 3, h, w)) -> [StageOutput 0..S]``, normalised input.
        image: the original uint8 ``(3, H, W)`` RGB image.
        settings: ``scales``, ``flip`` and the mode each view is run with (whole or slide).
        mean, std: the normalisation of the evaluation pipeline (0-1 scale, RGB).
        stages: indices into the network's outputs.
        device: where the network runs.
        resize_backend: the views' resize (``cv2``: mmcv's ``imrescale``; see
            :mod:`knet_lightning.data.resize`).

    Returns:
        one float32 ``(C, H, W)`` map per entry of ``stages``: the mean over the views of the
        softmax of each view's logits, brought back to the original image.
    """
    check_backend(resize_backend)
    height, width = image.shape[-2:]
    # the evaluation pipeline without its resize, on each view: uint8 -> [0, 1] float32 -> normalised
    normalize = build_transforms(False, short_edge=None, mean=mean, std=std)
    image = image.cpu()  # OpenCV resizes on the CPU
    sums: list[Tensor | None] = [None] * len(stages)
    views = 0
    # scales outer, flips inner: the order of mmcv's TestTimeAug (it decides the float sums)
    for factor in settings.scales:
        view_size = tta_view_size(height, width, factor)
        view = normalize(resize_image(image, view_size, resize_backend)).to(device)
        for flipped in (False, True) if settings.flip else (False,):
            # flipping the normalised view equals normalising the flipped one (per-pixel maps)
            inputs = view.flip(-1) if flipped else view
            logits = _logits_at_input(network, inputs.unsqueeze(0), settings, stages)
            for k, view_logits in enumerate(logits):
                # MMSegmentation's postprocess_result: flip back at the view's size, then
                # bilinear to the original size; merge_preds: softmax over classes, summed
                if flipped:
                    view_logits = view_logits.flip(-1)
                probs = _resize(view_logits, (height, width))[0].softmax(dim=0)
                sums[k] = probs if sums[k] is None else sums[k].add_(probs)  # type: ignore[union-attr]
            views += 1
    return [total / views for total in sums]  # type: ignore[operator]


# --------------------------------------------------------------------------- the batch


def _merged(mask_logits: Tensor) -> StageOutput:
    """A stage output holding merged logits (or probabilities): the kernels of several windows
    or views have no single value, so ``kernels`` is empty ``(B, N, 0)``."""
    return StageOutput(
        mask_logits=mask_logits, cls_logits=None, kernels=mask_logits.new_zeros((*mask_logits.shape[:2], 0))
    )


def run_test_time(network: Network, batch: Mapping[str, Any], settings: TestTimeSettings, stages: Sequence[int],
                  inference: Mapping[str, Any] | None = None) -> list[StageOutput | None]:  # fmt: skip
    """The stage outputs of ``batch`` under ``settings``, for the task's post-processing.

    Args:
        network: ``network(images (B, 3, h, w)) -> [StageOutput 0..S]`` on normalised images.
        batch: one network batch of the task (``task.network_batches``): ``images``
            ``(B, 3, H, W)`` normalised, unpadded (every image of the size of the tensor),
            ``image_sizes``, ``targets`` (with ``orig_size``) and, for ``tta``, ``mean``/``std``.
        settings: the strategy.
        stages: the stage indices the caller reads (e.g. ``task.stages(split)``; -1: the last).
        inference: the ``knet_inference`` settings; their ``resize_backend`` (default ``cv2``,
            mmcv's) resizes the ``tta`` views.

    Returns:
        ``[StageOutput or None] * (S + 1)``: at each index of ``stages`` an output whose
        ``mask_logits`` ``(B, C, H, W)`` are the sliding-window canvas (``slide``) or the mean
        class probabilities at original size (``tta``; the images must reach it at their original
        size: the evaluation pipeline without its resize); ``None`` at the stages not asked for.
        Plain whole-image inference returns the network's outputs as they are.

    Raises:
        ValueError: ``tta`` on images that are not at their original size, or without the
            batch's normalisation.
    """
    images = batch["images"]
    if settings.is_plain:
        return list(network(images))
    if not stages:
        raise ValueError("run_test_time: no stage to compute")
    counted, num_outputs = _counting(network)
    if settings.tta:
        resize_backend = str((inference or {}).get("resize_backend", "cv2"))
        return _placed(stages, _tta_batch(counted, batch, settings, stages, resize_backend), num_outputs[0])
    height, width = images.shape[-2:]
    sizes = [tuple(int(v) for v in size) for size in batch["image_sizes"]]
    if any(size != (height, width) for size in sizes):
        raise ValueError(f"{KEY}.mode=slide: the images {sizes} must be unpadded (one network batch per size, "
                         f"task.network_batches), got a batch of {height}x{width}")  # fmt: skip
    canvases = slide_inference(counted, images, settings.crop_size, settings.stride, stages)  # type: ignore[arg-type]
    return _placed(stages, [_merged(c) for c in canvases], num_outputs[0])


def _counting(network: Network) -> tuple[Network, list[int]]:
    """``network``, and a list that receives the number of its outputs (S + 1) at each call."""
    counts: list[int] = []

    def counted(images: Tensor) -> Sequence[StageOutput]:
        outputs = network(images)
        counts.append(len(outputs))
        return outputs

    return counted, counts


def _placed(stages: Sequence[int], outputs: list[StageOutput], num_outputs: int) -> list[StageOutput | None]:
    """``outputs`` (one per entry of ``stages``) at their stage indices of a list of the
    network's length, ``None`` between."""
    placed: list[StageOutput | None] = [None] * num_outputs
    for s, out in zip(stages, outputs):
        placed[s % num_outputs] = out
    return placed


def _tta_batch(network: Network, batch: Mapping[str, Any], settings: TestTimeSettings, stages: Sequence[int],
               resize_backend: str) -> list[StageOutput]:  # fmt: skip
    images = batch["images"]
    if "mean" not in batch or "std" not in batch:
        raise ValueError(f"{KEY}.tta: the batch has no 'mean'/'std' (collate_batch(mean=, std=)) to recover the "
                         "original image from")  # fmt: skip
    padded = tuple(int(v) for v in images.shape[-2:])
    per_image: list[list[Tensor]] = []
    for b, target in enumerate(batch["targets"]):
        size = tuple(int(v) for v in batch["image_sizes"][b])
        orig = tuple(int(v) for v in target["orig_size"])
        if size != orig or size != padded:
            raise ValueError(
                f"{KEY}.tta: image {target.get('file_name', b)} reaches the network at {size[0]}x{size[1]} (batch "
                f"{padded[0]}x{padded[1]}), not at its original size {orig[0]}x{orig[1]}: multi-scale + flip resizes "
                "the original image itself, so the evaluation pipeline must not resize (the CLI calls "
                "datamodule.keep_eval_size() for model.test_time.tta=true; a Segmenter builds its transforms so)"
            )
        original = recover_uint8_image(images[b], batch["mean"], batch["std"])
        per_image.append(multi_scale_flip(network, original, settings, batch["mean"], batch["std"], stages,
                                          images.device, resize_backend))  # fmt: skip
    return [_merged(torch.stack([probs[k] for probs in per_image])) for k in range(len(stages))]
