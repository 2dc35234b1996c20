#!/usr/bin/env python
"""CPU latency of the K-Net network: ONNX Runtime against eager PyTorch, fp32.

Exports the network of a checkpoint (default: the ``experiment=synthetic`` model with random
weights, written to a temporary checkpoint) with :func:`knet_lightning.inference.onnx_export.export_onnx`,
then times one forward pass of the network alone (no reading, transforms or post-processing) on a
``(batch, 3, size, size)`` input, in rounds: each round runs every backend in turn (warm-up, then
timed runs), so that a machine's drift spreads over all; the median of all timed runs is
reported. Backends: PyTorch NCHW, PyTorch channels-last (what ``KNetModule`` picks for CPU
inference, :mod:`knet_lightning.runtime.memory_format`) and ONNX Runtime (CPUExecutionProvider), all with
the same number of threads. Prints a Markdown table and writes JSON. ::

    python scripts/bench_onnx.py                                   # the default run's model, 512x512
    python scripts/bench_onnx.py logs/train/runs/<run>/checkpoints/last.ckpt --runs 30
    python scripts/bench_onnx.py --override model.net.backbone_depth=50 --override model.net.channels=256
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def default_checkpoint(folder: Path, overrides: list[str]) -> Path:
    """A checkpoint, in a training run's format, of the default config's model (random weights)."""
    from hydra import compose, initialize_config_dir

    from knet_lightning.checkpoint.io import atomic_torch_save
    from knet_lightning.checkpoint.keys import INFERENCE_KEY, MODEL_CONFIG_KEY
    from knet_lightning.cli import build_model, config_dir
    from knet_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={folder}", *overrides])
    n = int(cfg.data.num_classes)
    things = int(cfg.data.get("num_things", n))
    classes = SimpleNamespace(names=[f"class{i}" for i in range(n)], isthing=[i < things for i in range(n)],
                              colors=[(0, 0, 0)] * n)  # fmt: skip
    module = build_model(cfg, classes)
    path = folder / "model.ckpt"
    atomic_torch_save({
        "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
        MODEL_CONFIG_KEY: module.model_config,
        INFERENCE_KEY: {"short_edge": None, "max_size": None, "mean": list(IMAGENET_MEAN),
                        "std": list(IMAGENET_STD), "size_divisor": int(cfg.data.size_divisor),
                        "dataset_ids": list(range(1, n + 1))},
    }, path)  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, nargs="?", help="default: the default config's model, random weights")
    parser.add_argument("--override", action="append", default=[], help="Hydra override of the default model")
    parser.add_argument("--size", type=int, default=512, help="input height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs the backends in turn")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of a backend before its timed ones")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of a backend per round")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--out", type=Path, default=Path("bench_results/onnx_cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    from knet_lightning import Segmenter
    from knet_lightning.inference.onnx_export import export_onnx
    from knet_lightning.inference.onnx_runtime import OnnxRuntimeNetwork

    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint or default_checkpoint(folder, args.override)
        start = time.perf_counter()
        onnx_path = export_onnx(checkpoint, folder / "model.onnx")
        export_s = time.perf_counter() - start
        onnx_mb = onnx_path.stat().st_size / 2**20
        network = OnnxRuntimeNetwork(onnx_path, threads=torch.get_num_threads())
        seg = Segmenter.from_checkpoint(checkpoint, precision="fp32", stage=network.stage)
        nchw = seg.module.net.eval().to(memory_format=torch.contiguous_format)
        # a copy in channels-last: converting in place would change the NCHW network's layout too
        cl_net = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
        images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        images_cl = images.contiguous(memory_format=torch.channels_last)
        feed = {"images": images.numpy()}

        def torch_nchw() -> torch.Tensor:
            with torch.inference_mode():
                return nchw(images)[network.stage].mask_logits

        def torch_channels_last() -> torch.Tensor:
            with torch.inference_mode():
                return cl_net(images_cl)[network.stage].mask_logits

        def ort() -> list:
            return network.session.run(network.output_names, feed)

        ref = torch_nchw()
        rel_diff = float((ref - torch.from_numpy(ort()[0])).abs().max() / ref.abs().max())
        backends = {"torch NCHW": torch_nchw, "torch channels-last": torch_channels_last, "onnxruntime": ort}
        times: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(args.rounds):
            for name, fn in backends.items():
                # untimed runs after each switch: the previous backend's worker threads spin on for a
                # while (ONNX Runtime's and OpenMP's), which would be charged to this one
                for _ in range(args.warmup):
                    fn()
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)

    base = statistics.median(times["torch NCHW"])
    rows = [{"backend": name, "median_ms": statistics.median(ms), "min_ms": min(ms),
             "speedup_vs_torch_nchw": base / statistics.median(ms)} for name, ms in times.items()]  # fmt: skip
    print(f"{checkpoint if args.checkpoint else 'default config (random weights)'}: input {args.batch}x3x"
          f"{args.size}x{args.size}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}; median of {args.rounds} rounds x {args.runs} runs ({args.warmup} warm-up each)\n"
          f"export {export_s:.1f} s, {onnx_mb:.1f} MB; ONNX Runtime vs PyTorch max rel diff "
          f"{rel_diff:.1e}\n")  # fmt: skip
    print("| backend | median ms | min ms | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['speedup_vs_torch_nchw']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": rows, "checkpoint": str(args.checkpoint) if args.checkpoint else None, "overrides": args.override,
        "size": args.size, "batch": args.batch, "rounds": args.rounds, "runs": args.runs, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "export_s": export_s, "onnx_mb": onnx_mb, "max_rel_diff": rel_diff,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "machine": platform.processor(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }, indent=2))  # fmt: skip
    print(f"\nJSON written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
