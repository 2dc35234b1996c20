#!/usr/bin/env python
"""End-to-end training throughput of the documented multi-GPU command on a COCO-like data set.

Writes a synthetic data set in the COCO panoptic layout (133 COCO-like categories, JPEG images
with 8 things and 4 stuff segments each, as ``scripts/bench.py``'s data section), then runs
exactly the README's command ::

    python -m knet_lightning experiment=knet_r50_coco_panoptic_1x data.root=<set> trainer=ddp

with size-reducing overrides (steps, images, no test; random weights: nothing is downloaded), reads the run's ``metrics.json``
(``train/throughput``: images/s of all processes, forward + backward + step, from
:class:`knet_lightning.runtime.sweep.JobStats`) and the peak GPU memory, and prints a table and writes
JSON. On a GPU machine ``trainer=ddp`` is NCCL over all GPUs with bf16 autocast.

    python scripts/bench_train.py --images 64 --size 800x1216 --steps 60 --out bench_results/train.json
    python scripts/bench_train.py --tiny     # CPU smoke run (ResNet-18, 64x64): the numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knet_bench.data import write_coco_panoptic  # noqa: E402

README_COMMAND = ["experiment=knet_r50_coco_panoptic_1x", "trainer=ddp"]
TINY = ["model.net.backbone_depth=18", "model.net.channels=32", "model.net.num_groups=8",
        "model.net.feedforward_channels=64", "model.net.num_heads=2", "model.num_proposals=10",
        "trainer.precision=32"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="training images written")
    parser.add_argument("--size", default="800x1216", help="HxW of the written images (resized to 800 short side)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (the first epoch's warm-up counts)")
    parser.add_argument("--workers", type=int, default=8, help="data loader workers per process")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: ResNet-18, 64x64, 4 steps")
    parser.add_argument("--out", type=Path, default=Path("bench_results/train.json"))
    parser.add_argument("extra", nargs="*", help="more overrides, appended")
    args = parser.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    overrides = list(args.extra)
    if args.tiny:
        h, w, args.images, args.steps, args.workers = 64, 96, 8, 4, 0
        overrides = TINY + ["data.train_short_edge=64", "data.train_max_size=96", "data.eval_short_edge=64",
                            "data.eval_max_size=96", "trainer.accelerator=cpu", "trainer.devices=1",
                            "trainer.strategy.process_group_backend=gloo", *overrides]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="knet_bench_train_"))
    try:
        root = work / "coco"
        write_coco_panoptic(root, args.images, (h, w), (8, 4), seed=0)
        # the written split is both the training and the validation split
        command = [sys.executable, "-m", "knet_lightning", *README_COMMAND, f"data.root={root}",
                   "data.val_split=train", "data.test_split=train", f"data.num_workers={args.workers}",
                   f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=2", "test_after_fit=false",
                   "logger=csv", "model.net.pretrained=false", *overrides]  # fmt: skip
        start = time.perf_counter()
        env = {**os.environ, "KNET_ROOT": str(work)}
        proc = subprocess.run(command, cwd=work, env=env, text=True, capture_output=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n")
            return proc.returncode
        (metrics_file,) = list((work / "logs").glob("train/runs/*/metrics.json"))
        metrics = json.loads(metrics_file.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": " ".join(command[1:]),
        "images": args.images,
        "image_size": [h, w],
        "steps": args.steps,
        "wall_s": wall,
        "train_images_per_s": metrics.get("train/throughput"),
        "peak_gpu_memory_mb": metrics.get("train/peak_memory_mb"),
        "params_m": metrics.get("model/params_m"),
        "gflops": metrics.get("model/gflops"),
    }
    try:
        import torch

        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        result["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    print("| metric | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
