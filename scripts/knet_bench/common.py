"""What every section shares: the COCO class counts, the modes' profiles, the run context and
the synthetic scenes and batches the sections measure on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# COCO panoptic: 80 thing and 53 stuff classes.
NUM_THINGS = 80
NUM_STUFF = 53
NUM_CLASSES = NUM_THINGS + NUM_STUFF
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


@dataclass
class Context:
    """One run: its profile and device, and the results so far (the mask2former section reads
    the knet section's rows for its ratios).

    ``memory_format`` is K-Net's (``--memory-format``): ``auto`` picks per mode what the
    package's ``channels_last=auto`` picks (:func:`knet_lightning.runtime.memory_format.prefers_channels_last`),
    ``channels-last`` or ``nchw`` fix it; ``amp_dtype`` is
    the autocast dtype of K-Net's forward and losses (``--amp``), None for fp32.
    """

    profile: Profile
    device: torch.device
    seed: int
    results: dict[str, Any]
    memory_format: str = "auto"
    amp_dtype: torch.dtype | None = None
    # model.optimizer.implementation of the train steps (--optimizer)
    optimizer: str = "auto"


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


def count_params(net: nn.Module) -> tuple[int, int]:
    """All parameters and the trainable ones."""
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return total, trainable
