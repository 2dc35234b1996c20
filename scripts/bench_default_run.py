#!/usr/bin/env python
"""The default run's CPU cost: data loading per batch and the training step, per configuration.

Builds the ``experiment=synthetic`` model once per configuration (each given as ``NAME=override,override``
on top of the default config), takes one training batch, and times full training steps (forward,
matching, losses, backward, AdamW) **interleaved**: the configurations step in turn, so that a
machine's drift between runs cancels. Loading is timed in this process, single-threaded, as one
loader worker does it. Prints a Markdown table and writes JSON. ::

    python scripts/bench_default_run.py \\
        "full-width=model.net.backbone_base_channels=64" "half-width (default)="
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from knet_lightning.cli import build_datamodule, build_model, config_dir
from knet_lightning.configs import register_configs
from knet_lightning.training.optim import build_optimizer


def _compose(root: Path, overrides: list[str]):  # -> DictConfig
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={root}", *overrides])


def _loader_ms(cfg, batches: int) -> float:  # noqa: ANN001
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's
    try:
        datamodule = build_datamodule(cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
        it = iter(datamodule.train_dataloader())
        next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return (time.perf_counter() - start) / batches * 1000
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", help='NAME=override,override ("NAME=" is the default config)')
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration (after 3 warm-up)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/default_run.json"))
    args = parser.parse_args(argv)
    register_configs()
    root = Path(tempfile.mkdtemp(prefix="knet_bench_default_"))
    os.environ.setdefault("KNET_ROOT", str(root))
    runs = []
    for spec in args.configs:
        name, _, rest = spec.partition("=")
        overrides = [o for o in rest.split(",") if o] + ["data.num_workers=0", "data.persistent_workers=false"]
        cfg = _compose(root, overrides)
        loader = _loader_ms(cfg, batches=20)
        datamodule = build_datamodule(cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
        module = build_model(cfg, datamodule.class_info).train()
        batch = next(iter(datamodule.train_dataloader()))
        optimizer = build_optimizer(module.net, module.optimizer_settings)
        params = sum(p.numel() for p in module.net.parameters())
        runs.append({"name": name, "overrides": overrides, "loader_ms": loader, "params": params, "module": module,
                     "batch": batch, "optimizer": optimizer, "step_ms": [], "backward_ms": []})  # fmt: skip

    for i in range(3 + args.steps):
        for run in runs:
            start = time.perf_counter()
            loss, _ = run["module"].training_loss(run["batch"]["images"], run["batch"]["targets"])
            mid = time.perf_counter()
            loss.backward()
            backward = time.perf_counter() - mid
            run["optimizer"].step()
            run["optimizer"].zero_grad()
            if i >= 3:
                run["step_ms"].append((time.perf_counter() - start) * 1000)
                run["backward_ms"].append(backward * 1000)

    machine = {"cpu": platform.processor() or platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    print(f"machine: {machine}")
    print("| configuration | parameters (M) | loader ms / batch (1 thread) | train step ms | backward ms |")
    print("|---|---|---|---|---|")
    results = []
    for run in runs:
        row = {"name": run["name"], "overrides": run["overrides"], "params_m": run["params"] / 1e6,
               "loader_ms": run["loader_ms"], "step_ms": statistics.median(run["step_ms"]),
               "backward_ms": statistics.median(run["backward_ms"])}  # fmt: skip
        results.append(row)
        print(
            f"| {row['name']} | {row['params_m']:.2f} | {row['loader_ms']:.1f} | {row['step_ms']:.0f} | {row['backward_ms']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
