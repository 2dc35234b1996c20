#!/usr/bin/env python
"""CPU inference precision: PQ and speed of a panoptic checkpoint with ``Segmenter(precision=...)``.

Runs the checkpoint over a COCO-panoptic split (default: the synthetic val split of ``make
train``) once per precision, scores every prediction with the task's own metrics (as ``mode=eval``
does), and times the whole pass (reading, preprocessing, network, post-processing) after one
untimed warm-up pass. Prints a Markdown table and writes JSON. ::

    python scripts/bench_inference_precision.py logs/train/runs/<run>/checkpoints/last.ckpt data/synthetic
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from knet_lightning import Segmenter
from knet_lightning.data.coco import COCOPanopticDataset
from knet_lightning.inference.segmenter import bf16_supported


def evaluate(seg: Segmenter, dataset: COCOPanopticDataset, files: list[Path], batch_size: int) -> tuple[dict, float]:
    """The task's test metrics over ``files`` and the seconds per image of the pass."""
    task = seg.module.task
    start = time.perf_counter()
    results = seg(files, batch_size=batch_size, progress=False)
    seconds = (time.perf_counter() - start) / len(files)
    last = task.num_stages
    for index, result in enumerate(results):
        _, target = dataset[index]
        task.update("test", last, [result.prediction], [task.ground_truth(target)], [target])
    return {k: float(v) for k, v in task.compute("test").items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("root", type=Path, help="COCO panoptic root (annotations/ and <split>2017/)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench_results/inference_precision.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = COCOPanopticDataset(args.root, split=args.split)
    files = [dataset.image_dir / dataset.image_info(i)["file_name"] for i in range(len(dataset))]
    rows = []
    for precision in ("fp32", "bf16"):
        seg = Segmenter.from_checkpoint(args.checkpoint, precision=precision)
        seg(files[: args.batch_size], batch_size=args.batch_size, progress=False)  # warm-up
        metrics, seconds = evaluate(seg, dataset, files, args.batch_size)
        rows.append({"precision": precision, "pq": metrics["test/pq"], "sq": metrics["test/sq"],
                     "rq": metrics["test/rq"], "ms_per_image": seconds * 1e3})  # fmt: skip
    base = rows[0]
    for row in rows:
        row["pq_change"] = row["pq"] - base["pq"]
        row["speedup"] = base["ms_per_image"] / row["ms_per_image"]
    print(f"{len(files)} images of {args.root} ({args.split}), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16: {bf16_supported(torch.device('cpu'))}\n")  # fmt: skip
    print("| precision | PQ | SQ | RQ | PQ change | ms / image | speed-up |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['pq']:.2f} | {r['sq']:.2f} | {r['rq']:.2f} | {r['pq_change']:+.2f} | "
              f"{r['ms_per_image']:.1f} | {r['speedup']:.2f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "images": len(files), "batch_size": args.batch_size,
                                    "threads": torch.get_num_threads(), "machine": platform.processor(),
                                    "cpu_capability": torch.backends.cpu.get_cpu_capability()}, indent=2))  # fmt: skip
    print(f"\nJSON written to {args.out}")


if __name__ == "__main__":
    main()
