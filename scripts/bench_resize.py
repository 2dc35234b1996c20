#!/usr/bin/env python
"""The image resize of the data pipelines: speed, and agreement with the references' (mmcv's).

``mmcv.imresize`` / ``imrescale`` (the official K-Net code and MMSegmentation) is
``cv2.resize(INTER_LINEAR)`` on uint8: fixed-point bilinear weights, no antialiasing. Candidates,
each on a uint8 RGB image resized keep-ratio as the test pipelines do, 640x480 -> 1067x800 (COCO,
enlarged) and 1500x1100 -> 698x512 (ADE20K, shrunk):

- ``cv2``: :func:`knet_lightning.data.resize.resize_image` with ``backend="cv2"`` (OpenCV itself,
  tensor <-> array conversion included): what the pipelines run;
- ``torchvision``: ``resize(antialias=True)`` on uint8, the pipelines' resize before;
- ``torchvision-noaa``: the same without antialiasing;
- ``port-scalar`` / ``port-simd``: OpenCV's 8-bit bilinear arithmetic ported to numpy, with the
  vertical pass of its scalar code (``FixedPtCast``: ``(b0 S0 + b1 S1 + 2^21) >> 22``) or of its
  vector code (``VResizeLinearVec_32s8u``: 16-bit high products of ``S >> 4``, ``(x + 2) >> 2``).
  OpenCV runs the vector code on most columns and the scalar code on the rest, depending on the
  CPU's vector width, so a port is exact only if it reproduces that split as well.

Times are the median of ``--runs`` calls on ``--threads`` threads (1: as a loader worker). Prints a
Markdown table and writes JSON (``--out``)::

    python scripts/bench_resize.py --runs 50 --out bench_resize.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from knet_lightning.data.resize import rescale_size, resize_image

# (name, (h, w) of the image, the keep-ratio scale the pipelines use)
CASES = [
    ("640x480 -> 1067x800 (COCO test, enlarged)", (480, 640), (1333, 800)),
    ("1500x1100 -> 698x512 (ADE20K test, shrunk)", (1100, 1500), (2048, 512)),
]
COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
COEF_SCALE = 1 << COEF_BITS


def _fixed_point_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's ``resize`` linear tables along one axis: source index and the two 11-bit weights."""
    scale = src / dst
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = f - s
    low = s < 0
    f[low], s[low] = 0, 0
    high = s >= src - 1
    f[high], s[high] = 0, src - 1
    w0 = np.rint((1.0 - f) * COEF_SCALE).astype(np.int64)
    w1 = np.rint(f * COEF_SCALE).astype(np.int64)
    return s, w0, w1


def port(img: np.ndarray, size: tuple[int, int], vector: bool) -> np.ndarray:
    """``cv2.resize(img, (w, h), INTER_LINEAR)`` on uint8 ``(H, W, C)``, ported to numpy."""
    h, w = size
    src_h, src_w = img.shape[:2]
    sx, ax0, ax1 = _fixed_point_weights(src_w, w)
    sy, by0, by1 = _fixed_point_weights(src_h, h)
    x = img.astype(np.int64)
    nx = np.minimum(sx + 1, src_w - 1)
    rows = x[:, sx] * ax0[None, :, None] + x[:, nx] * ax1[None, :, None]  # (H, w, C), scale 2^11
    ny = np.minimum(sy + 1, src_h - 1)
    s0, s1 = rows[sy], rows[ny]
    b0, b1 = by0[:, None, None], by1[:, None, None]
    if vector:
        out = (((s0 >> 4) * b0) >> 16) + (((s1 >> 4) * b1) >> 16)
        out = (out + 2) >> 2
    else:
        out = (s0 * b0 + s1 * b1 + (1 << 21)) >> 22
    return out.clip(0, 255).astype(np.uint8)


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_resize.json")
    args = parser.parse_args(argv)
    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for name, (h, w), scale in CASES:
        # smooth content plus noise, as photographs: every rounding shows somewhere
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(7 * xx + c) * np.cos(5 * yy - c) for c in range(3)], -1) * 100 + 128
        img = (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        size = rescale_size(h, w, scale)
        reference = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)  # mmcv.imresize
        tensor = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        candidates: dict[str, Callable[[], np.ndarray]] = {
            "cv2": lambda t=tensor, s=size: resize_image(t, s, "cv2").permute(1, 2, 0).numpy(),
            "torchvision": lambda t=tensor, s=size: F.resize(t, list(s), antialias=True).permute(1, 2, 0).numpy(),
            "torchvision-noaa": lambda t=tensor, s=size: F.resize(t, list(s), antialias=False).permute(1, 2, 0).numpy(),
            "port-scalar": lambda i=img, s=size: port(i, s, vector=False),
            "port-simd": lambda i=img, s=size: port(i, s, vector=True),
        }
        for method, fn in candidates.items():
            out = fn()
            diff = np.abs(out.astype(np.int16) - reference.astype(np.int16))
            rows.append({
                "case": name, "method": method, "size": list(size), "ms": _median_ms(fn, args.runs),
                "identical_pct": 100.0 * float((diff == 0).mean()), "max_diff": int(diff.max()),
            })  # fmt: skip
    print(f"\ncpu: {torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
          f"threads {args.threads}, OpenCV {cv2.__version__}, torch {torch.__version__}\n")  # fmt: skip
    print("| case | method | time (ms) | values equal to mmcv's | max diff (grey levels) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['method']} | {r['ms']:.2f} | {r['identical_pct']:.3f} % | {r['max_diff']} |")
    with open(args.out, "w") as f:
        json.dump({"cpu": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                   "opencv": cv2.__version__, "torch": torch.__version__, "rows": rows}, f, indent=2)  # fmt: skip
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
