#!/usr/bin/env python
"""Padding of COCO training batches: plain shuffle vs aspect-ratio grouped batching.

Draws the training order of whole epochs with the package's samplers (``ResumableSampler`` and
``GroupedResumableSampler``, one per simulated GPU), resizes every image as the COCO training
pipeline does (short side drawn per image from the experiment's range, long side <= 1333, mmcv
rounding: ``keep_ratio_size``) and pads each per-GPU batch as ``collate_batch`` does (to the
batch's largest height and width, rounded up to 32). Reports the padded-pixel fraction (padding
pixels / pixels of the padded batches), the share of batches that mix orientations and the padded
pixels per image. No image is read: the sizes come from ``--annotations`` (a COCO JSON, e.g.
``instances_train2017.json``) or, by default, a COCO-like mix (``COCO_LIKE``). Prints a Markdown
table and writes JSON. ::

    python scripts/bench_grouped_batching.py
    python scripts/bench_grouped_batching.py --annotations /data/coco/annotations/instances_train2017.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from knet_lightning.data.sampling import GroupedResumableSampler, ResumableSampler, aspect_ratio_flags
from knet_lightning.data.transforms import keep_ratio_size

# (width, height, share): COCO's most common sizes (long side 640), 70 % landscape, 25 % portrait, 5 % square
COCO_LIKE = (
    (640, 480, 0.30), (640, 427, 0.22), (640, 426, 0.08), (640, 360, 0.05), (500, 375, 0.05),
    (480, 640, 0.12), (427, 640, 0.09), (375, 500, 0.04),
    (640, 640, 0.05),
)  # fmt: skip
COCO_TRAIN_IMAGES = 118_287  # train2017

# the experiments' training resize: (setting, short side range, long side cap)
SETTINGS = (("ms3x: short side U[640, 800]", (640, 800), 1333), ("1x: short side 800", (800, 800), 1333))


def coco_like_sizes(n: int, seed: int) -> np.ndarray:
    """``(n, 2)`` ``(height, width)`` drawn from :data:`COCO_LIKE`."""
    shares = np.array([s for _, _, s in COCO_LIKE])
    picks = np.random.default_rng(seed).choice(len(COCO_LIKE), size=n, p=shares / shares.sum())
    return np.array([(h, w) for w, h, _ in COCO_LIKE], dtype=np.int64)[picks]


def annotation_sizes(path: Path) -> np.ndarray:
    """``(N, 2)`` ``(height, width)`` of the ``images`` of a COCO JSON."""
    images = json.loads(path.read_text())["images"]
    return np.array([(int(im["height"]), int(im["width"])) for im in images], dtype=np.int64)


def epoch_batches(sampler: ResumableSampler, batch_size: int) -> list[np.ndarray]:
    """One rank's batches of the sampler's epoch: index arrays of ``batch_size`` (the last may be short)."""
    order = np.array([index for _, index in sampler], dtype=np.int64)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def measure(
    sizes: np.ndarray, grouped: bool, batch_size: int, gpus: int, short_edge: tuple[int, int], max_size: int,
    divisor: int, epochs: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Padding over ``epochs`` epochs of ``gpus`` ranks with ``batch_size`` images each."""
    n = len(sizes)
    flags = aspect_ratio_flags(sizes)
    rng = np.random.default_rng(seed)
    pad_px = batch_px = mixed = batches = 0
    for epoch in range(epochs):
        shorts = rng.integers(short_edge[0], short_edge[1] + 1, size=n)
        resized = np.array([keep_ratio_size(int(h), int(w), int(s), max_size) for (h, w), s in zip(sizes, shorts)])
        seen: list[np.ndarray] = []
        for rank in range(gpus):
            kwargs = {"shuffle": True, "seed": seed, "num_replicas": gpus, "rank": rank}
            sampler = (GroupedResumableSampler(range(n), batch_size, flags, **kwargs) if grouped
                       else ResumableSampler(range(n), batch_size, **kwargs))  # fmt: skip
            sampler.set_epoch(epoch)
            for batch in epoch_batches(sampler, batch_size):
                hw = resized[batch]
                side_h = math.ceil(hw[:, 0].max() / divisor) * divisor
                side_w = math.ceil(hw[:, 1].max() / divisor) * divisor
                batch_px += len(batch) * side_h * side_w
                pad_px += len(batch) * side_h * side_w - int((hw[:, 0] * hw[:, 1]).sum())
                mixed += len(set(flags[batch].tolist())) > 1
                batches += 1
                seen.append(batch)
        # every image at least once per epoch; beyond that only DistributedSampler's repeats that even the shards
        counts = np.bincount(np.concatenate(seen), minlength=n)
        assert counts.min() == 1 and counts.sum() - n < gpus, "an image was skipped or repeated"
    return {
        "padded_fraction": pad_px / batch_px,
        "mixed_batches": mixed / batches,
        "padded_mpx_per_image": batch_px / (epochs * n) / 1e6,
        "batches": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, default=None, help="COCO JSON whose 'images' sizes to use")
    parser.add_argument(
        "--images", type=int, default=COCO_TRAIN_IMAGES, help="COCO-like images (without --annotations)"
    )
    parser.add_argument("--batch-size", type=int, default=2, help="images per GPU")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size-divisor", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_results/grouped_batching.json"))
    args = parser.parse_args()
    sizes = annotation_sizes(args.annotations) if args.annotations else coco_like_sizes(args.images, args.seed)
    source = str(args.annotations) if args.annotations else f"COCO-like mix of {len(sizes)} sizes (COCO_LIKE)"
    flags = aspect_ratio_flags(sizes)
    square = int((sizes[:, 0] == sizes[:, 1]).sum())
    rows = []
    start = time.perf_counter()
    for setting, short_edge, max_size in SETTINGS:
        for grouped in (False, True):
            row = measure(sizes, grouped, args.batch_size, args.gpus, short_edge, max_size, args.size_divisor,
                          args.epochs, args.seed)  # fmt: skip
            rows.append({"setting": setting, "order": "grouped" if grouped else "plain shuffle", **row})
    print(f"{source}: {len(sizes)} images, {flags.mean():.1%} landscape, {1 - flags.mean() - square / len(sizes):.1%} "
          f"portrait, {square / len(sizes):.1%} square; {args.batch_size} images per GPU x {args.gpus} GPUs, "
          f"{args.epochs} epochs, pad to {args.size_divisor} ({time.perf_counter() - start:.0f} s)\n")  # fmt: skip
    print("| resize | order | padded pixels | batches mixing orientations | padded Mpx / image |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['order']} | {r['padded_fraction']:.1%} | {r['mixed_batches']:.1%} | "
              f"{r['padded_mpx_per_image']:.2f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": source, "images": len(sizes), "landscape": float(flags.mean()),
                                    "square": square / len(sizes), "batch_size": args.batch_size, "gpus": args.gpus,
                                    "epochs": args.epochs, "size_divisor": args.size_divisor, "rows": rows},
                                   indent=2))  # fmt: skip
    print(f"\nJSON written to {args.out}")


if __name__ == "__main__":
    main()
