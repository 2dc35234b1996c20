#!/usr/bin/env python
"""Speed and memory benchmarks of knet-lightning (issue 6).

Sections (``--sections``, default all):

* ``knet``: K-Net R50 panoptic (N=100, S=3, 80 things + 53 stuff) inference latency
  (forward + panoptic post-processing under ``torch.inference_mode``) and training step
  (forward + matching + losses + backward + AdamW step), with a per-part breakdown and
  peak memory.
* ``scaling``: params, GFLOPs, latency and train step over the number of proposals N and
  update stages S.
* ``eval``: throughput of our PanopticQuality, MeanIoU and (when importable) MaskAP.
* ``data``: per-worker throughput of the training input pipeline (decode + augment) on
  COCO-format files written to a temporary folder.
* ``mask2former``: the Hugging Face ``transformers`` Mask2Former R50 (random weights,
  built from its config, no download) in the same run, reported as ratios K-Net / M2F.

Modes: full (default: 512x512 and 800x1216, the whole N x S grid), ``--quick`` (512x512,
fewer repeats, a subset of the grid) and ``--tiny`` (ResNet-18, 64x64, N=10, S=1, one
repeat; exists for the smoke test ``tests/test_bench.py``, its numbers mean nothing).

Every figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones.
Breakdowns come from forward hooks on the submodules (``backbone``, ``fpn`` + ``neck``,
``kernel_head``, ``update_heads``, ``criterion.matcher``) and timers around the rest; the
``other`` column is what the parts do not cover (upsampling of the stage outputs, loss
summation), so the parts add up to the total. On CUDA every hook synchronizes, so there
the total is measured separately, without hooks.

Peak memory: on CPU the peak resident set size (``VmHWM``) of this process, reset before
each configuration through ``/proc/self/clear_refs`` (Linux >= 4.0), and its growth over
the RSS at the start of the configuration; on CUDA ``torch.cuda.max_memory_allocated``.

Output: Markdown tables on stdout and a JSON file (``--out``), rewritten after each
section so that an interrupted run keeps what it measured.

    python scripts/bench.py --quick --threads 2
    python scripts/bench.py --device cuda --out bench_results/h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

# Mask2Former is built from a config with random weights; nothing may be fetched.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from knet_lightning.criterion.criterion import KNetCriterion  # noqa: E402
from knet_lightning.data.coco import COCOPanopticDataset, id2rgb  # noqa: E402
from knet_lightning.data.transforms import build_transforms  # noqa: E402
from knet_lightning.evaluation.panoptic import PanopticQuality  # noqa: E402
from knet_lightning.evaluation.semantic import MeanIoU  # noqa: E402
from knet_lightning.models.knet import KNet  # noqa: E402
from knet_lightning.postprocess import panoptic_inference, panoptic_to_semantic  # noqa: E402

SCHEMA_VERSION = 1
SECTIONS = ("knet", "scaling", "eval", "data", "mask2former")
# COCO panoptic: 80 thing and 53 stuff classes.
NUM_THINGS = 80
NUM_STUFF = 53
NUM_CLASSES = NUM_THINGS + NUM_STUFF
IGNORE_INDEX = 255
# Order of the breakdown columns; "other" = total - sum of the measured parts.
INFER_PARTS = ("backbone", "fpn_neck", "kernel_head", "update_stages", "postprocess", "other")
TRAIN_PARTS = (
    "backbone",
    "fpn_neck",
    "kernel_head",
    "update_stages",
    "matching",
    "losses",
    "backward",
    "optimizer",
    "other",
)
Size = tuple[int, int]


# ---------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """Everything a mode decides: model, sizes, repeats and the grids.

    Sizes are ``(H, W)``; all network input sizes are multiples of 32.
    """

    name: str
    depth: int
    sizes: tuple[Size, ...]
    batches: tuple[int, ...]
    num_proposals: int
    num_stages: int
    warmup: int
    repeats: int
    # (N, S) points: params, GFLOPs and latency on all; the train step on grid_train.
    grid: tuple[tuple[int, int], ...]
    grid_train: tuple[tuple[int, int], ...]
    grid_size: Size
    # segments per synthetic training image (things, stuff), COCO-like
    scene: tuple[int, int]
    eval_images: int
    eval_size: Size
    ap_dets: int
    data_images: int
    data_size: Size
    data_short_edge: tuple[int, int]
    data_max_size: int
    data_passes: int
    m2f_tiny: bool
    m2f_queries: int


_FULL_GRID = tuple((n, s) for n in (50, 100, 200, 300) for s in (1, 2, 3, 4, 5))

PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        depth=50,
        sizes=((512, 512), (800, 1216)),
        batches=(1, 2),
        num_proposals=100,
        num_stages=3,
        warmup=2,
        repeats=5,
        grid=_FULL_GRID,
        grid_train=_FULL_GRID,
        grid_size=(800, 1216),
        scene=(8, 4),
        eval_images=500,
        eval_size=(512, 512),
        ap_dets=100,
        data_images=20,
        data_size=(480, 640),
        data_short_edge=(640, 800),
        data_max_size=1333,
        data_passes=3,
        m2f_tiny=False,
        # the published Mask2Former R50 COCO panoptic setting
        m2f_queries=200,
    ),
    "quick": Profile(
        name="quick",
        depth=50,
        sizes=((512, 512),),
        batches=(1, 2),
        num_proposals=100,
        num_stages=3,
        warmup=1,
        repeats=5,
        grid=((50, 1), (50, 3), (100, 1), (100, 3), (300, 1), (300, 3)),
        grid_train=((100, 1), (100, 3)),
        grid_size=(512, 512),
        scene=(8, 4),
        eval_images=200,
        eval_size=(512, 512),
        ap_dets=100,
        data_images=20,
        data_size=(480, 640),
        data_short_edge=(640, 800),
        data_max_size=1333,
        data_passes=2,
        m2f_tiny=False,
        m2f_queries=200,
    ),
    "tiny": Profile(
        name="tiny",
        depth=18,
        sizes=((64, 64),),
        batches=(1, 2),
        num_proposals=10,
        num_stages=1,
        warmup=1,
        repeats=1,
        grid=((10, 1), (20, 2)),
        grid_train=((10, 1),),
        grid_size=(64, 64),
        scene=(3, 2),
        eval_images=8,
        eval_size=(64, 64),
        ap_dets=10,
        data_images=3,
        data_size=(48, 64),
        data_short_edge=(48, 64),
        data_max_size=128,
        data_passes=1,
        m2f_tiny=True,
        m2f_queries=10,
    ),
}


# ---------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartTimer:
    """Wall time per named part, from forward hooks and explicit ``part`` blocks.

    Several modules may share one name (``fpn`` and ``neck`` -> ``fpn_neck``; every update
    head -> ``update_stages``): their times add up. Disabled, the hooks do nothing (used
    for the hook-free CUDA totals).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = True
        self.totals: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}
        self._handles: list[Any] = []

    def attach(self, module: nn.Module, name: str) -> None:
        def pre(mod: nn.Module, args: Any) -> None:
            if self.enabled:
                _sync(self.device)
                self._start[id(mod)] = time.perf_counter()

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            if self.enabled:
                _sync(self.device)
                self.totals[name] += time.perf_counter() - self._start.pop(id(mod))

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.totals[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.totals = defaultdict(float)
        self._start.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def attach_knet(timer: PartTimer, net: KNet, criterion: KNetCriterion | None = None) -> None:
    """Hooks on the stages of ``KNet.forward`` (and on the matcher inside the criterion)."""
    timer.attach(net.backbone, "backbone")
    timer.attach(net.fpn, "fpn_neck")
    timer.attach(net.neck, "fpn_neck")
    timer.attach(net.kernel_head, "kernel_head")
    for head in net.update_heads:
        timer.attach(head, "update_stages")
    if criterion is not None:
        timer.attach(criterion.matcher, "matching")


def measure(
    step: Callable[[], Any],
    device: torch.device,
    warmup: int,
    repeats: int,
    timer: PartTimer | None = None,
) -> dict[str, Any]:
    """Median wall time of ``step`` (and of the timer's parts) over ``repeats`` runs.

    Returns:
        ``total_ms`` (median), ``min_ms``, ``runs_ms`` (every timed run), ``parts_ms`` (the
        parts of the median run, the lower one for an even count; empty without a timer)
        and ``parts_total_ms`` (that run's total). Parts and total of ONE run are reported
        so that they add up; medians taken part by part need not. On CUDA with a timer,
        ``total_ms`` comes from extra hook-free runs, since every hook synchronizes.
    """
    for _ in range(warmup):
        step()
    totals: list[float] = []
    parts: list[dict[str, float]] = []
    for _ in range(repeats):
        if timer is not None:
            timer.reset()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        totals.append(time.perf_counter() - start)
        parts.append(dict(timer.totals) if timer is not None else {})
    median_run = sorted(range(repeats), key=totals.__getitem__)[(repeats - 1) // 2]
    parts_ms = {name: seconds * 1e3 for name, seconds in parts[median_run].items()}
    parts_total_ms = totals[median_run] * 1e3
    if timer is not None and device.type == "cuda":
        timer.enabled = False
        totals = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            totals.append(time.perf_counter() - start)
        timer.enabled = True
    return {
        "total_ms": statistics.median(totals) * 1e3,
        "min_ms": min(totals) * 1e3,
        "runs_ms": [t * 1e3 for t in totals],
        "parts_ms": parts_ms,
        "parts_total_ms": parts_total_ms,
    }


# ---------------------------------------------------------------------------- memory


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of /proc/self/status; None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the RSS at the start of a
    configuration is what is live, not what earlier configurations left cached."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of one configuration.

    CPU: resets the kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs) and
    reads ``VmHWM`` afterwards; where that is impossible it falls back to
    ``ru_maxrss``, which is the peak over the whole process life (``scope`` says which).
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scope = "config"
        self.start_mb = 0.0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        _malloc_trim()
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.scope = "process"
        rss = _status_kb("VmRSS")
        self.start_mb = rss / 1024 if rss is not None else 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def result(self) -> dict[str, Any]:
        """``peak_mb``, ``delta_mb`` (peak - memory at the start) and ``mem_kind``."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return {"peak_mb": peak, "delta_mb": peak - self.start_mb, "mem_kind": "cuda_max_allocated"}
        hwm = _status_kb("VmHWM") if self.scope == "config" else None
        if hwm is None:
            import resource

            self.scope = "process"
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        peak = hwm / 1024
        kind = "rss_peak" if self.scope == "config" else "rss_peak_process_lifetime"
        return {"peak_mb": peak, "delta_mb": peak - self.start_mb, "mem_kind": kind}


# ---------------------------------------------------------------------------- synthetic inputs


def make_scene(
    rng: np.random.Generator, height: int, width: int, num_things: int, num_stuff: int
) -> tuple[np.ndarray, np.ndarray]:
    """A random COCO-like panoptic layout: stuff bands under thing rectangles and ellipses.

    Args:
        rng: the random generator.
        height, width: image size.
        num_things, num_stuff: segments to draw (occluded ones are dropped).

    Returns:
        ``seg`` ``(H, W)`` int32 with segment ``k`` written as ``k + 1`` (every pixel is
        covered) and ``labels`` ``(K,)`` int64 contiguous ids (things ``[0, 80)``, stuff
        ``[80, 133)``).
    """
    seg = np.zeros((height, width), dtype=np.int32)
    num_stuff = max(1, min(num_stuff, height - 1))
    cuts = np.sort(rng.choice(np.arange(1, height), size=num_stuff - 1, replace=False)) if num_stuff > 1 else []
    bounds = [0, *[int(c) for c in cuts], height]
    for k in range(num_stuff):
        seg[bounds[k] : bounds[k + 1]] = k + 1
    labels = list(NUM_THINGS + rng.choice(NUM_STUFF, size=num_stuff, replace=False))
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(num_things):
        bh = int(rng.integers(max(2, height // 10), max(3, height // 3) + 1))
        bw = int(rng.integers(max(2, width // 10), max(3, width // 3) + 1))
        y0 = int(rng.integers(0, height - bh + 1))
        x0 = int(rng.integers(0, width - bw + 1))
        if rng.random() < 0.5:
            mask = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
        else:
            cy, cx = y0 + bh / 2, x0 + bw / 2
            mask = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1.0
        seg[mask] = num_stuff + i + 1
        labels.append(int(rng.integers(0, NUM_THINGS)))
    labels_arr = np.asarray(labels, dtype=np.int64)
    present = np.bincount(seg.ravel(), minlength=len(labels) + 1)[1:] > 0
    remap = np.zeros(len(labels) + 1, dtype=np.int32)
    remap[1:][present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return remap[seg], labels_arr[present]


def scene_target(seg: np.ndarray, labels: np.ndarray, device: torch.device) -> dict[str, Tensor]:
    """The batch-contract target (``masks`` bool ``(K, H, W)``, ``labels``, ``iscrowd``) of a scene."""
    seg_t = torch.from_numpy(seg).to(device)
    ids = torch.arange(1, len(labels) + 1, device=device, dtype=seg_t.dtype)
    return {
        "masks": seg_t[None] == ids[:, None, None],
        "labels": torch.from_numpy(labels).to(device),
        "iscrowd": torch.zeros(len(labels), dtype=torch.bool, device=device),
    }


def make_batch(
    profile: Profile, size: Size, batch: int, device: torch.device, seed: int
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Normalized random images ``(B, 3, H, W)`` and one synthetic target per image."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=gen).to(device)
    targets = [scene_target(*make_scene(rng, *size, *profile.scene), device) for _ in range(batch)]
    return images, targets


# K-Net's memory format, as KNetModule(channels_last=True) runs it by default; --no-channels-last
# measures the contiguous layout
MEMORY_FORMAT = torch.channels_last


def knet_images(images: Tensor) -> Tensor:
    """K-Net's input in the memory format it runs in."""
    return images.contiguous(memory_format=MEMORY_FORMAT)


def build_knet(profile: Profile, num_proposals: int, num_stages: int, device: torch.device, seed: int) -> KNet:
    torch.manual_seed(seed)
    net = KNet(
        num_things=NUM_THINGS,
        num_stuff=NUM_STUFF,
        task="panoptic",
        num_proposals=num_proposals,
        num_stages=num_stages,
        backbone_depth=profile.depth,
    )
    return net.to(device=device, memory_format=MEMORY_FORMAT)


def build_criterion(num_proposals: int, device: torch.device) -> KNetCriterion:
    return KNetCriterion("panoptic", NUM_THINGS, NUM_STUFF, num_proposals).to(device)


def knet_infer_step(net: KNet, images: Tensor, timer: PartTimer | None) -> Callable[[], None]:
    """Forward + panoptic post-processing of every image, under ``inference_mode``."""
    size = tuple(images.shape[-2:])
    ctx = timer.part if timer is not None else (lambda name: contextlib.nullcontext())

    def step() -> None:
        with torch.inference_mode():
            last = net(images)[-1]
            with ctx("postprocess"):
                for b in range(images.shape[0]):
                    panoptic_inference(
                        last.mask_logits[b],
                        last.cls_logits[b],
                        num_things=net.num_things,
                        num_proposals=net.num_proposals,
                        image_size=size,
                        padded_size=size,
                        output_size=size,
                    )

    return step


def knet_train_step(
    net: KNet,
    criterion: KNetCriterion,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    targets: list[dict[str, Tensor]],
    timer: PartTimer | None,
) -> Callable[[], None]:
    """Forward + matching + losses + backward + AdamW step."""
    ctx = timer.part if timer is not None else (lambda name: contextlib.nullcontext())

    def step() -> None:
        outputs = net(images)
        with ctx("criterion"):
            losses = criterion(outputs, targets)
        loss = torch.stack(list(losses.values())).sum()
        with ctx("backward"):
            loss.backward()
        with ctx("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def make_optimizer(net: KNet) -> torch.optim.Optimizer:
    # The training recipe: AdamW, lr 1e-4, weight decay 0.05, backbone at 0.25 x lr.
    return torch.optim.AdamW(net.param_groups(lr=1e-4, weight_decay=0.05))


def breakdown(result: dict[str, Any], order: Sequence[str]) -> dict[str, float]:
    """Parts in ``order``: ``losses`` = criterion - matching; ``other`` = the run's total - the rest."""
    parts = dict(result["parts_ms"])
    if "criterion" in parts:
        parts["losses"] = parts.pop("criterion") - parts.get("matching", 0.0)
    measured = sum(v for k, v in parts.items() if k != "other")
    parts["other"] = result["parts_total_ms"] - measured
    return {name: float(parts.get(name, 0.0)) for name in order}


def count_params(net: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return total, trainable


def count_gflops(net: nn.Module, images: Tensor) -> float:
    """Forward GFLOPs of one image (torch.utils.flop_counter: a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(images)
    return counter.get_total_flops() / 1e9


# ---------------------------------------------------------------------------- sections


@dataclass
class Context:
    profile: Profile
    device: torch.device
    seed: int
    results: dict[str, Any]


def confident_outputs(target: dict[str, Tensor], num_proposals: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Stride-4 logits shaped like a trained K-Net's, built from one synthetic target.

    Each ground-truth segment gets a kernel (things: a proposal with a 0.9 class score;
    stuff: its class kernel with a smooth edge), the other proposals repeat a random
    thing's mask with a low score (the duplicates a trained model leaves), and absent stuff
    classes get empty masks. Random-weight outputs are the opposite: no confident pixel,
    so every kernel competes everywhere (the worst case of the sparse merge).

    Returns:
        ``mask_logits`` ``(N, H/4, W/4)`` and ``cls_logits`` ``(N, C)``, N = proposals + stuff.
    """
    masks = target["masks"].float()[:, None]  # (G, 1, H, W)
    soft = F.avg_pool2d(F.avg_pool2d(masks, 4, 4), 3, 1, 1, count_include_pad=False)[:, 0]  # (G, h, w)
    seg_logits = (soft * 16 - 8).clamp(-8, 8)
    labels = target["labels"]
    num_kernels = num_proposals + NUM_STUFF
    mask_logits = torch.full((num_kernels, *seg_logits.shape[1:]), -8.0)
    cls_logits = torch.full((num_kernels, NUM_CLASSES), -6.0)
    things = (labels < NUM_THINGS).nonzero().flatten().tolist()
    slot = 0
    for g, label in enumerate(labels.tolist()):
        noise = torch.randn(seg_logits.shape[1:], generator=gen)
        if label < NUM_THINGS and slot < num_proposals:
            mask_logits[slot], cls_logits[slot, label] = seg_logits[g] + noise, 2.2  # score 0.90
            slot += 1
        elif label >= NUM_THINGS:
            k = num_proposals + label - NUM_THINGS
            mask_logits[k], cls_logits[k, label] = seg_logits[g] + noise, 2.2
    for k in range(slot, num_proposals):
        if things:
            g = things[int(torch.randint(len(things), (1,), generator=gen))]
            mask_logits[k] = seg_logits[g] + torch.randn(seg_logits.shape[1:], generator=gen)
        cls_logits[k, int(torch.randint(NUM_THINGS, (1,), generator=gen))] = -3.0  # score 0.05
    return mask_logits, cls_logits


def postprocess_rows(
    net: KNet, images: Tensor, target: dict[str, Tensor], p: Profile, seed: int
) -> list[dict[str, Any]]:
    """One image's panoptic merge by method (dense / sparse) on random-weight and confident outputs."""
    size = tuple(images.shape[-2:])
    with torch.inference_mode():
        last = net(images[:1])[-1]
    gen = torch.Generator().manual_seed(seed)
    sources = {
        "random-weight model": (last.mask_logits[0].cpu(), last.cls_logits[0].cpu()),
        "confident (trained-like)": confident_outputs({k: v.cpu() for k, v in target.items()}, net.num_proposals, gen),
    }
    rows = []
    for source, (mask_logits, cls_logits) in sources.items():
        mask_logits = mask_logits.to(images.device)
        cls_logits = cls_logits.to(images.device)
        for method in ("dense", "sparse"):

            def merge(method: str = method) -> None:
                panoptic_inference(
                    mask_logits, cls_logits, net.num_things, net.num_proposals, size, size, size, method=method
                )

            res = measure(merge, images.device, p.warmup, p.repeats)
            rows.append({"size": f"{size[0]}x{size[1]}", "outputs": source, "method": method, "ms": res["total_ms"]})
    return rows


def section_knet(ctx: Context) -> dict[str, Any]:
    """K-Net R50 panoptic: inference and train step per (size, batch), with breakdowns."""
    p, device = ctx.profile, ctx.device
    net = build_knet(p, p.num_proposals, p.num_stages, device, ctx.seed)
    criterion = build_criterion(p.num_proposals, device)
    params, trainable = count_params(net)
    timer = PartTimer(device)
    attach_knet(timer, net, criterion)
    rows: list[dict[str, Any]] = []
    merge_rows: list[dict[str, Any]] = []
    try:
        for size in p.sizes:
            for batch in p.batches:
                images, targets = make_batch(p, size, batch, device, ctx.seed)
                images = knet_images(images)
                base = {"size": f"{size[0]}x{size[1]}", "batch": batch}
                net.eval()
                with PeakMemory(device) as mem:
                    res = measure(knet_infer_step(net, images, timer), device, p.warmup, p.repeats, timer)
                rows.append(_knet_row(base, "inference", res, INFER_PARTS, batch, mem.result()))
                if batch == p.batches[0]:
                    merge_rows += postprocess_rows(net, images, targets[0], p, ctx.seed)
                net.train()
                optimizer = make_optimizer(net)
                with PeakMemory(device) as mem:
                    step = knet_train_step(net, criterion, optimizer, images, targets, timer)
                    res = measure(step, device, p.warmup, p.repeats, timer)
                rows.append(_knet_row(base, "train", res, TRAIN_PARTS, batch, mem.result()))
                del optimizer, images, targets
                gc.collect()
    finally:
        timer.remove()
    return {
        "model": {
            "backbone": f"ResNet-{p.depth}",
            "num_proposals": p.num_proposals,
            "num_stages": p.num_stages,
            "num_classes": NUM_CLASSES,
            "params": params,
            "trainable_params": trainable,
        },
        "rows": rows,
        "postprocess": merge_rows,
        "notes": [
            "inference = forward + panoptic post-processing (output at input size) under torch.inference_mode; "
            f"the post-processing runs method='auto' ({'dense' if device.type == 'cuda' else 'sparse'} here)",
            "post-processing by method: one image's merge of the same outputs; random-weight model = the forward "
            "above, confident = logits built from the synthetic ground truth like a trained model's (segments "
            "with score 0.9, duplicate proposals with 0.05)",
            "train = forward + matching + losses + backward + AdamW step; random weights, synthetic targets "
            f"with {p.scene[0]} things + {p.scene[1]} stuff segments per image",
            "other = total - sum of the measured parts (stage-output upsampling, loss sum, Python overhead)",
            "peak MB: CPU peak RSS of the process during the configuration (weights included); delta MB: peak minus "
            "the RSS at its start (freed heap is returned with malloc_trim first, but memory the allocators still "
            "hold can hide part of the growth); CUDA: max_memory_allocated and its growth",
        ],
    }


def _knet_row(
    base: dict[str, Any], mode: str, res: dict[str, Any], order: Sequence[str], batch: int, mem: dict[str, Any]
) -> dict[str, Any]:
    return {
        **base,
        "mode": mode,
        "total_ms": res["total_ms"],
        "min_ms": res["min_ms"],
        "runs_ms": res["runs_ms"],
        "images_per_s": batch / (res["total_ms"] / 1e3),
        "breakdown_total_ms": res["parts_total_ms"],
        "parts_ms": breakdown(res, order),
        **mem,
    }


def section_scaling(ctx: Context) -> dict[str, Any]:
    """Params, GFLOPs, inference latency and train step over (N, S), batch 1."""
    p, device = ctx.profile, ctx.device
    rows: list[dict[str, Any]] = []
    images, targets = make_batch(p, p.grid_size, 1, device, ctx.seed)
    images = knet_images(images)
    for n, s in p.grid:
        net = build_knet(p, n, s, device, ctx.seed).eval()
        params, _ = count_params(net)
        # The FLOP count runs one forward: it doubles as the first warm-up.
        gflops = count_gflops(net, images)
        infer = measure(knet_infer_step(net, images, None), device, p.warmup, p.repeats)
        row: dict[str, Any] = {
            "num_proposals": n,
            "num_stages": s,
            "params_m": params / 1e6,
            "gflops": gflops,
            "infer_ms": infer["total_ms"],
            "train_ms": None,
        }
        if (n, s) in p.grid_train:
            net.train()
            criterion = build_criterion(n, device)
            step = knet_train_step(net, criterion, make_optimizer(net), images, targets, None)
            row["train_ms"] = measure(step, device, p.warmup, p.repeats)["total_ms"]
        rows.append(row)
        del net
        gc.collect()
    return {
        "size": f"{p.grid_size[0]}x{p.grid_size[1]}",
        "rows": rows,
        "notes": [
            "GFLOPs: torch.utils.flop_counter on one forward pass of one image (a multiply-add counts 2 FLOPs; "
            "papers often quote multiply-adds), without post-processing",
            "infer_ms: forward + post-processing, batch 1; train_ms: forward + matching + losses + backward + "
            "AdamW step, batch 1 (only the points listed in the profile's grid_train)",
        ],
    }


def _eval_pool(p: Profile, seed: int, pool: int) -> list[dict[str, Any]]:
    """A few predicted/GT pairs, cycled over to reach ``eval_images`` (the metrics cache nothing)."""
    rng = np.random.default_rng(seed)
    h, w = p.eval_size
    out = []
    for _ in range(pool):
        seg, labels = make_scene(rng, h, w, *p.scene)
        num = len(labels)
        # Prediction: the layout shifted by a few pixels with some labels swapped.
        pred = np.roll(seg, shift=(max(1, h // 100), max(1, w // 60)), axis=(0, 1))
        pred_labels = labels.copy()
        swap = rng.random(num) < 0.2
        pred_labels[swap] = np.where(
            pred_labels[swap] < NUM_THINGS,
            rng.integers(0, NUM_THINGS, size=int(swap.sum())),
            rng.integers(NUM_THINGS, NUM_CLASSES, size=int(swap.sum())),
        )
        # Ground truth has void: a band at the bottom.
        gt = seg.copy()
        gt[h - max(1, h // 16) :] = 0
        gt_present = np.bincount(gt.ravel(), minlength=num + 1)[1:] > 0
        gt_segments = [
            {"id": k + 1, "category_id": int(labels[k]), "iscrowd": False} for k in range(num) if gt_present[k]
        ]
        pred_segments = [{"id": k + 1, "category_id": int(pred_labels[k])} for k in range(num)]
        lut = np.full(num + 1, IGNORE_INDEX, dtype=np.int64)
        lut[1:] = labels
        out.append(
            {
                "pred_seg": torch.from_numpy(pred),
                "pred_segments": pred_segments,
                "gt_seg": torch.from_numpy(gt),
                "gt_segments": gt_segments,
                "gt_sem": torch.from_numpy(lut[gt]),
                "thing_ids": np.nonzero(labels < NUM_THINGS)[0],
                "labels": labels,
                "seg": seg,
            }
        )
    return out


def _ap_inputs(p: Profile, item: dict[str, Any], rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """Instance predictions (``ap_dets`` masks: shifted GT things + random boxes) and eval_gt RLEs."""
    from knet_lightning.evaluation.instance import encode_masks

    h, w = p.eval_size
    seg, labels, things = item["seg"], item["labels"], item["thing_ids"]
    gt_masks = seg[None] == (things + 1)[:, None, None]
    shifted = np.roll(gt_masks, shift=(max(1, h // 100), max(1, w // 60)), axis=(1, 2))
    extra = p.ap_dets - len(things)
    boxes = np.zeros((max(0, extra), h, w), dtype=bool)
    for i in range(len(boxes)):
        bh, bw = int(rng.integers(2, h // 3 + 2)), int(rng.integers(2, w // 3 + 2))
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        boxes[i, y0 : y0 + bh, x0 : x0 + bw] = True
    masks = np.concatenate([shifted, boxes])[: p.ap_dets]
    pred_labels = np.concatenate([labels[things], rng.integers(0, NUM_THINGS, size=len(boxes))])[: p.ap_dets]
    pred = {
        "masks": torch.from_numpy(masks),
        "scores": torch.from_numpy(rng.random(len(masks)).astype(np.float32)),
        "labels": torch.from_numpy(pred_labels.astype(np.int64)),
    }
    gt = {
        "rles": encode_masks(gt_masks),
        "labels": torch.from_numpy(labels[things]),
        "iscrowd": torch.zeros(len(things), dtype=torch.bool),
        "area": torch.from_numpy(gt_masks.reshape(len(things), -1).sum(1).astype(np.float64)),
    }
    return pred, gt


def section_eval(ctx: Context) -> dict[str, Any]:
    """Images per second of PQ, mIoU (and mask AP) on predicted maps at ``eval_size``."""
    p = ctx.profile
    n = p.eval_images
    pool = _eval_pool(p, ctx.seed, min(n, 8))
    rows: list[dict[str, Any]] = []
    notes: list[str] = [
        f"{n} images of {p.eval_size[0]}x{p.eval_size[1]} cycled from {len(pool)} synthetic predicted/GT pairs; "
        "time = all updates + one compute()",
    ]

    def timed(name: str, update: Callable[[int], None], compute: Callable[[], Any]) -> None:
        # update(k) adds pool item k
        start = time.perf_counter()
        for i in range(n):
            update(i % len(pool))
        t_update = time.perf_counter() - start
        start = time.perf_counter()
        compute()
        t_compute = time.perf_counter() - start
        total = t_update + t_compute
        rows.append(
            {
                "metric": name,
                "images": n,
                "update_ms_per_image": t_update / n * 1e3,
                "compute_ms": t_compute * 1e3,
                "total_s": total,
                "images_per_s": n / total,
            }
        )

    pq = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    timed(
        "PanopticQuality",
        lambda k: pq.update(pool[k]["pred_seg"], pool[k]["pred_segments"], pool[k]["gt_seg"], pool[k]["gt_segments"]),
        pq.compute,
    )
    miou = MeanIoU(NUM_CLASSES, ignore_index=IGNORE_INDEX)
    timed(
        "MeanIoU (incl. panoptic_to_semantic)",
        lambda k: miou.update(
            panoptic_to_semantic(pool[k]["pred_seg"], pool[k]["pred_segments"], IGNORE_INDEX), pool[k]["gt_sem"]
        ),
        miou.compute,
    )
    try:
        from knet_lightning.evaluation.instance import MaskAP
    except ImportError as e:
        notes.append(f"MaskAP skipped: knet_lightning.evaluation.instance.MaskAP not importable ({e})")
    else:
        rng = np.random.default_rng(ctx.seed)
        ap_pool = [_ap_inputs(p, it, rng) for it in pool]
        ap = MaskAP(NUM_THINGS, max_dets=max(10, p.ap_dets))
        timed(
            f"MaskAP ({p.ap_dets} dets/image)",
            lambda k: ap.update([ap_pool[k][0]], [ap_pool[k][1]]),
            ap.compute,
        )
        notes.append("MaskAP: update RLE-encodes the predicted masks; compute runs pycocotools COCOeval")
    return {"rows": rows, "notes": notes}


def write_coco_panoptic(root: Path, num_images: int, size: Size, scene: tuple[int, int], seed: int) -> None:
    """COCO panoptic files (JPEG images, RGB-id PNGs, JSON with the 133 COCO-like categories)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    (root / "train2017").mkdir(parents=True)
    png_dir = root / "annotations" / "panoptic_train2017"
    png_dir.mkdir(parents=True)
    categories = [
        {"id": c + 1, "name": f"class{c}", "isthing": int(c < NUM_THINGS), "supercategory": "x"}
        for c in range(NUM_CLASSES)
    ]
    images, annotations = [], []
    for i in range(num_images):
        seg, labels = make_scene(rng, h, w, *scene)
        colors = rng.integers(0, 256, size=(len(labels) + 1, 3))
        noise = rng.normal(0.0, 20.0, size=(h, w, 3))
        rgb = np.clip(colors[seg] + noise, 0, 255).astype(np.uint8)
        name = f"{i:012d}"
        Image.fromarray(rgb).save(root / "train2017" / f"{name}.jpg", quality=90)
        # COCO ids are arbitrary; make them large so the R + 256 G + 256^2 B coding matters.
        seg_ids = 1000 * (np.arange(len(labels)) + 1) + i
        id_map = np.zeros(len(labels) + 1, dtype=np.uint32)
        id_map[1:] = seg_ids
        Image.fromarray(id2rgb(id_map[seg])).save(png_dir / f"{name}.png")
        areas = np.bincount(seg.ravel(), minlength=len(labels) + 1)[1:]
        images.append({"id": i, "file_name": f"{name}.jpg", "height": h, "width": w})
        annotations.append(
            {
                "image_id": i,
                "file_name": f"{name}.png",
                "segments_info": [
                    {"id": int(sid), "category_id": int(lab) + 1, "iscrowd": 0, "area": int(a), "bbox": [0, 0, 1, 1]}
                    for sid, lab, a in zip(seg_ids, labels, areas)
                ],
            }
        )
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "panoptic_train2017.json").write_text(json.dumps(payload))


def section_data(ctx: Context) -> dict[str, Any]:
    """Per-sample time of the reader alone and of reader + training transforms, one process."""
    p = ctx.profile
    tmp = Path(tempfile.mkdtemp(prefix="knet-bench-data-"))
    try:
        write_coco_panoptic(tmp, p.data_images, p.data_size, p.scene, ctx.seed)
        train_tf = build_transforms(
            train=True, kind="multiscale", short_edge=p.data_short_edge, max_size=p.data_max_size
        )
        rows = []
        torch.manual_seed(ctx.seed)
        for name, transforms in (("decode (reader only)", None), ("decode + train transforms", train_tf)):
            ds = COCOPanopticDataset(tmp, "train", transforms=transforms)
            for i in range(min(2, len(ds))):  # warm-up: page cache, lazy imports
                ds[i]
            times = []
            for _ in range(p.data_passes):
                for i in range(len(ds)):
                    start = time.perf_counter()
                    ds[i]
                    times.append(time.perf_counter() - start)
            median = statistics.median(times)
            rows.append(
                {
                    "pipeline": name,
                    "samples": len(times),
                    "median_ms": median * 1e3,
                    "mean_ms": statistics.fmean(times) * 1e3,
                    "samples_per_s_per_worker": 1.0 / median,
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "rows": rows,
        "notes": [
            f"{p.data_images} JPEG images of {p.data_size[1]}x{p.data_size[0]} (WxH) in COCO panoptic format, "
            f"{p.scene[0]} things + {p.scene[1]} stuff segments each, {p.data_passes} pass(es)",
            f"train transforms: build_transforms(train=True, kind='multiscale', short_edge={p.data_short_edge}, "
            f"max_size={p.data_max_size}) = resize + flip + drop empty + normalize",
            "per worker: one process, torch threads as set; a DataLoader with k workers scales up to k times this",
        ],
    }


def build_mask2former(profile: Profile, device: torch.device, seed: int) -> nn.Module:
    """Mask2Former (HF transformers) with a ResNet backbone, random weights, from its config."""
    import inspect

    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    from transformers.utils import logging as hf_logging

    # A ResNet backbone draws a "not a supported model" warning; it works (see the smoke test).
    hf_logging.set_verbosity_error()
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if profile.m2f_tiny:
        backbone = ResNetConfig(
            embedding_size=16,
            hidden_sizes=[16, 32, 64, 128],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            out_features=stages,
        )
        sizes: dict[str, Any] = dict(
            feature_size=32,
            mask_feature_size=32,
            hidden_dim=32,
            encoder_feedforward_dim=64,
            dim_feedforward=64,
            encoder_layers=1,
            decoder_layers=2,
            num_attention_heads=2,
            train_num_points=256,
        )
    else:
        backbone = ResNetConfig(
            embedding_size=64,
            hidden_sizes=[256, 512, 1024, 2048],
            depths=[3, 4, 6, 3],
            layer_type="bottleneck",
            out_features=stages,
        )
        sizes = {}
    params = inspect.signature(Mask2FormerConfig.__init__).parameters
    if "use_pretrained_backbone" in params:  # transformers 4.x; 5.x never loads backbone weights here
        sizes["use_pretrained_backbone"] = False
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=NUM_CLASSES, num_queries=profile.m2f_queries, **sizes
    )
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(config).to(device)


def section_mask2former(ctx: Context) -> dict[str, Any]:
    """Mask2Former inference and train step at the ``knet`` section's sizes and batches."""
    try:
        import transformers
        from transformers import Mask2FormerImageProcessor
    except ImportError as e:
        return {
            "status": "skipped",
            "reason": f"transformers is not importable ({e}); install the bench extra: pip install -e '.[bench]'",
            "rows": [],
        }
    p, device = ctx.profile, ctx.device
    model = build_mask2former(p, device, ctx.seed)
    processor = Mask2FormerImageProcessor()
    params, _ = count_params(model)
    knet_rows = {
        (r["size"], r["batch"], r["mode"]): r
        for r in ctx.results.get("sections", {}).get("knet", {}).get("rows", [])
    }
    rows: list[dict[str, Any]] = []
    for size in p.sizes:
        for batch in p.batches:
            images, targets = make_batch(p, size, batch, device, ctx.seed)
            mask_labels = [t["masks"].float() for t in targets]
            class_labels = [t["labels"] for t in targets]
            key = f"{size[0]}x{size[1]}"

            def infer() -> None:
                with torch.inference_mode():
                    out = model(pixel_values=images)
                    processor.post_process_panoptic_segmentation(out, target_sizes=[size] * batch)

            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

            def train() -> None:
                out = model(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for mode, step in (("inference", infer), ("train", train)):
                model.train(mode == "train")
                with PeakMemory(device) as mem:
                    res = measure(step, device, p.warmup, p.repeats)
                knet = knet_rows.get((key, batch, mode))
                rows.append(
                    {
                        "size": key,
                        "batch": batch,
                        "mode": mode,
                        "m2f_ms": res["total_ms"],
                        "m2f_runs_ms": res["runs_ms"],
                        "knet_ms": knet["total_ms"] if knet else None,
                        "ratio_knet_over_m2f": knet["total_ms"] / res["total_ms"] if knet else None,
                        **{f"m2f_{k}": v for k, v in mem.result().items()},
                    }
                )
            del optimizer, images, targets, mask_labels, class_labels
            gc.collect()
    notes = [
        f"transformers {transformers.__version__}; Mask2Former with a ResNet backbone "
        f"({'tiny' if p.m2f_tiny else 'R50'}), {p.m2f_queries} queries, {params / 1e6:.1f} M params, random weights",
        "inference = forward + Mask2FormerImageProcessor.post_process_panoptic_segmentation; train = forward with "
        "its own loss (mask_labels / class_labels, point-sampled) + backward + AdamW step",
        "ratio < 1: K-Net is faster",
    ]
    if not knet_rows:
        notes.append("the knet section did not run in this invocation: no ratios")
    return {"model": {"params": params, "num_queries": p.m2f_queries}, "rows": rows, "notes": notes}


SECTION_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "knet": section_knet,
    "scaling": section_scaling,
    "eval": section_eval,
    "data": section_data,
    "mask2former": section_mask2former,
}


# ---------------------------------------------------------------------------- reporting


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table: ``columns`` are ``(key, header)``; a missing value prints ``-``."""
    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def render_section(name: str, data: dict[str, Any]) -> str:
    """The Markdown of one section's results."""
    out = [f"## {name}", ""]
    status = data.get("status", "ok")
    if status != "ok":
        out.append(f"**{status}**: {data.get('reason', '')}")
        return "\n".join(out) + "\n"
    rows = data.get("rows", [])
    if name == "knet":
        m = data["model"]
        out.append(
            f"{m['backbone']}, N={m['num_proposals']}, S={m['num_stages']}, {m['num_classes']} classes, "
            f"{m['params'] / 1e6:.1f} M params ({m['trainable_params'] / 1e6:.1f} M trainable)\n"
        )
        out.append(
            markdown_table(
                rows,
                [
                    ("size", "size"),
                    ("batch", "batch"),
                    ("mode", "mode"),
                    ("total_ms", "median ms"),
                    ("min_ms", "min ms"),
                    ("images_per_s", "img/s"),
                    ("peak_mb", "peak MB"),
                    ("delta_mb", "delta MB"),
                ],
            )
        )
        for mode, order in (("inference", INFER_PARTS), ("train", TRAIN_PARTS)):
            sub = [{**r, **r["parts_ms"]} for r in rows if r["mode"] == mode]
            out += ["", f"Breakdown ({mode}, ms, of the median run):", ""]
            cols = [("size", "size"), ("batch", "batch"), ("breakdown_total_ms", "total")] + [(k, k) for k in order]
            out.append(markdown_table(sub, cols))
        if data.get("postprocess"):
            out += ["", "Panoptic post-processing of one image by merge method (ms):", ""]
            out.append(markdown_table(data["postprocess"], [("size", "size"), ("outputs", "outputs"),
                                                            ("method", "method"), ("ms", "median ms")]))
    elif name == "scaling":
        out.append(f"Input {data['size']}, batch 1\n")
        out.append(
            markdown_table(
                rows,
                [
                    ("num_proposals", "N"),
                    ("num_stages", "S"),
                    ("params_m", "params (M)"),
                    ("gflops", "GFLOPs"),
                    ("infer_ms", "inference ms"),
                    ("train_ms", "train step ms"),
                ],
            )
        )
    elif name == "eval":
        out.append(
            markdown_table(
                rows,
                [
                    ("metric", "metric"),
                    ("images", "images"),
                    ("update_ms_per_image", "update ms/img"),
                    ("compute_ms", "compute ms"),
                    ("images_per_s", "img/s"),
                ],
            )
        )
    elif name == "data":
        out.append(
            markdown_table(
                rows,
                [
                    ("pipeline", "pipeline"),
                    ("samples", "samples"),
                    ("median_ms", "median ms"),
                    ("mean_ms", "mean ms"),
                    ("samples_per_s_per_worker", "samples/s/worker"),
                ],
            )
        )
    elif name == "mask2former":
        out.append(
            markdown_table(
                rows,
                [
                    ("size", "size"),
                    ("batch", "batch"),
                    ("mode", "mode"),
                    ("knet_ms", "K-Net ms"),
                    ("m2f_ms", "M2F ms"),
                    ("ratio_knet_over_m2f", "K-Net / M2F"),
                    ("m2f_peak_mb", "M2F peak MB"),
                    ("m2f_delta_mb", "M2F delta MB"),
                ],
            )
        )
    if data.get("notes"):
        out.append("")
        out += [f"- {note}" for note in data["notes"]]
    out.append(f"\n_section time: {data.get('seconds', 0.0):.1f} s_")
    return "\n".join(out) + "\n"


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, memory, library versions and the GPU (if used)."""
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) / 2**20
    versions = {}
    for pkg in ("torch", "torchvision", "numpy", "pycocotools", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": mem_total,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "device": str(device),
        "gpu": None,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device if device.type == "cuda" else 0)
    return info


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="knet-lightning benchmarks: latency, train step, scaling, evaluation, data loading, Mask2Former",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="512x512 only, fewer repeats, a subset of the N x S grid")
    mode.add_argument("--tiny", action="store_true", help="ResNet-18, 64x64, N=10, S=1, one repeat (smoke test only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench.json"), help="JSON output file")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
        help=f"sections to run, in this order: {' '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="run K-Net in the contiguous (NCHW) layout instead of channels-last (the package default)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    global MEMORY_FORMAT
    MEMORY_FORMAT = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    # Keep the requested order stable (the ratios need knet before mask2former).
    sections = [s for s in SECTIONS if s in args.sections]
    results: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "knet_memory_format": "channels_last" if args.channels_last else "contiguous",
        "mode": profile.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(device),
        "profile": asdict(profile),
        "sections": {},
    }
    ctx = Context(profile=profile, device=device, seed=args.seed, results=results)
    m = results["machine"]
    print(f"# knet-lightning benchmark ({profile.name})\n")
    print(
        f"CPU {m['cpu_model']} ({m['cpu_affinity']} usable cores), torch {m['versions']['torch']} with "
        f"{m['torch_threads']} threads, device {device}" + (f" ({m['gpu']})" if device.type == "cuda" else "") + "\n",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed = False
    for name in sections:
        start = time.perf_counter()
        try:
            data = SECTION_FUNCS[name](ctx)
            data.setdefault("status", "ok")
        except Exception as e:  # a benchmark run reports every section it can
            failed = True
            data = {"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        data["seconds"] = time.perf_counter() - start
        results["sections"][name] = data
        print(render_section(name, data), flush=True)
        args.out.write_text(json.dumps(results, indent=2, default=float))
    print(f"JSON written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
