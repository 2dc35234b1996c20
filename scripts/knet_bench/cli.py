"""The command line: parses the flags, runs the chosen sections in their fixed order, prints
each section's Markdown and rewrites the JSON after each one."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from knet_lightning.runtime.memory_format import prefers_channels_last

from .common import PROFILES, Context
from .data import section_data
from .evaluation import section_eval
from .knet import section_knet
from .mask2former import section_mask2former
from .report import render_section
from .scaling import section_scaling
from .zoo import section_zoo

SCHEMA_VERSION = 1
SECTIONS = ("knet", "scaling", "eval", "data", "mask2former", "zoo")
SECTION_FUNCS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "knet": section_knet,
    "scaling": section_scaling,
    "eval": section_eval,
    "data": section_data,
    "mask2former": section_mask2former,
    "zoo": section_zoo,
}


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
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        metavar="SECTION",
        help=f"sections to run, in this order: {' '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--amp",
        choices=("none", "bf16"),
        default="none",
        help="bf16 autocast of forward and losses (trainer.precision=bf16-mixed); default fp32",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        metavar="HxW",
        help="input sizes of the knet, mask2former and zoo sections (multiples of 32), instead of the mode's",
    )
    parser.add_argument(
        "--memory-format",
        choices=("auto", "channels-last", "nchw"),
        default="auto",
        help="K-Net's memory format; auto (the package default, model.channels_last=auto): channels-last "
        "on CUDA and AVX-512 CPUs, and for inference on AVX2-only CPUs, whose training steps run NCHW",
    )
    parser.add_argument(
        "--optimizer",
        choices=("auto", "fused", "foreach", "for_loop"),
        default="auto",
        help="AdamW kernel of the train steps (model.optimizer.implementation; auto: the package default)",
    )
    args = parser.parse_args(argv)
    if args.sizes is not None:
        try:
            args.sizes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.sizes)
        except ValueError:
            parser.error(f"--sizes: expected HxW entries such as 800x1344, got {args.sizes}")
        if any(len(s) != 2 or s[0] % 32 or s[1] % 32 for s in args.sizes):
            parser.error(f"--sizes: each size must be HxW with multiples of 32, got {args.sizes}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.sizes is not None:
        profile = replace(profile, sizes=args.sizes)
    layouts = {
        "auto": f"inference {'channels-last' if prefers_channels_last(device, False) else 'NCHW'}, training "
        f"{'channels-last' if prefers_channels_last(device, True) else 'NCHW'}",
        "channels-last": "channels-last",
        "nchw": "NCHW",
    }
    # Keep the requested order stable (the ratios need knet before mask2former).
    sections = [s for s in SECTIONS if s in args.sections]
    results: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "knet_memory_format": layouts[args.memory_format],
        "optimizer_implementation": args.optimizer,
        "amp": args.amp,
        "mode": profile.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(device),
        "profile": asdict(profile),
        "sections": {},
    }
    ctx = Context(
        profile=profile,
        device=device,
        seed=args.seed,
        results=results,
        memory_format=args.memory_format,
        amp_dtype=torch.bfloat16 if args.amp == "bf16" else None,
        optimizer=args.optimizer,
    )
    m = results["machine"]
    print(f"# knet-lightning benchmark ({profile.name})\n")
    print(
        f"CPU {m['cpu_model']} ({m['cpu_affinity']} usable cores), torch {m['versions']['torch']} with "
        f"{m['torch_threads']} threads, device {device}"
        + (f" ({m['gpu']})" if device.type == "cuda" else "")
        + f"; CPU capability {torch.backends.cpu.get_cpu_capability()}; K-Net "
        f"{layouts[args.memory_format]}, AdamW {args.optimizer}\n",
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
