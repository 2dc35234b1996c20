"""The GPU check: one prepared run of what a lent CUDA GPU must show, into one JSON file.

    scripts/gpu_check.sh                         # one CUDA GPU: about 8 minutes, gpu_check.json
    scripts/gpu_check.sh --device cpu --tiny     # the same steps, tiny, on the CPU (tests/test_gpu_check.py)

Steps, each recorded (with its seconds) even when another fails:

1. ``bench``: ``scripts/bench.py --sections knet mask2former zoo`` at 800x1216, bf16 (batch 1 and
   2): K-Net R50 / Swin-L / R101-DCN and Mask2Former R50 / Swin-L train img/s, inference FPS,
   peak memory.
2. ``train``: 300 steps of K-Net R50 (``trainer=gpu``) on synthetic 800x800 images (COCO's
   size); the loss of the first and last 30 logged steps.
3. ``ddp_resume``: two epochs of 25 steps with ``trainer=ddp`` (the NCCL path of the headline
   command, one process), against one epoch, stopped, then resumed with ``ckpt_path=last``: the
   largest weight difference between the two ends (0: exact).
4. ``device_paths``: the sparse and dense panoptic merges and the fused AdamW on the device
   against their CPU results (the dense merge's two folds against each other).

``--tiny``: ResNet-18 at 64x64 and a few steps, for the CPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = ["model.num_proposals=6", "model.num_stages=1", "model.net.backbone_depth=18",
              "model.net.channels=32", "model.net.num_groups=8", "model.net.feedforward_channels=64",
              "model.net.num_heads=2"]  # fmt: skip
# K-Net R50 as the paper trains it (N=100, S=3, 256 channels), from scratch on the synthetic classes
R50 = ["model.num_proposals=100", "model.num_stages=3", "model.net.backbone_depth=50",
       "model.net.backbone_base_channels=64", "model.net.channels=256", "model.net.num_groups=32",
       "model.net.feedforward_channels=2048", "model.net.num_heads=8", "model.net.frozen_stages=1"]  # fmt: skip


def knet(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m knet_lightning *args``; a failure raises with the run's last output."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "-m", "knet_lightning", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"knet_lightning {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def losses(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as fh:
        return [float(row["train/loss"]) for row in csv.DictReader(fh) if row.get("train/loss")]


def run_settings(opts: argparse.Namespace, work: Path) -> list[str]:
    """What every training step shares: the data (generated once under ``work``), the model, the logger."""
    common = [f"data.root={work / 'data'}", "logger=csv", "test_after_fit=false", "model.num_vis_images=0",
              "trainer.log_every_n_steps=1", "data.num_val=2", "data.val_batch_size=2"]  # fmt: skip
    if opts.tiny:
        return common + TINY_MODEL + ["data.image_size=64", "data.num_workers=0", "data.persistent_workers=false",
                                      "model.scheduler.warmup_iters=5"]  # fmt: skip
    return common + R50 + ["data.image_size=800", "data.num_workers=4"]


def step_bench(opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / "bench.json"
    size = ["--tiny"] if opts.tiny else ["--sizes", "800x1216"]
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", opts.device, "--sections", "knet",
               "mask2former", "zoo", "--amp", "bf16", "--out", str(out), *size]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, timeout=opts.time_limit)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def step_train(opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    steps = 40 if opts.tiny else 300
    run_dir = work / "train"
    trainer = ["trainer=cpu"] if opts.device == "cpu" else ["trainer=gpu"]
    knet([*run_settings(opts, work), *trainer, "data.num_train=16", f"data.batch_size={2 if not opts.tiny else 4}",
          f"trainer.max_steps={steps}", "trainer.max_epochs=1000", "trainer.check_val_every_n_epoch=1000",
          f"hydra.run.dir={run_dir}"], ROOT, opts.time_limit)  # fmt: skip
    values = losses(run_dir)
    window = max(1, min(30, len(values) // 4))
    first, last = sum(values[:window]) / window, sum(values[-window:]) / window
    return {"steps": len(values), "loss_first": first, "loss_last": last, "falling": last < first, "losses": values}


def step_ddp_resume(opts: argparse.Namespace, work: Path) -> dict[str, Any]:

    from knet_lightning.checkpoint.io import load_checkpoint_file

    batch = 4 if opts.tiny else 2
    accelerator = ["trainer.accelerator=cpu"] if opts.device == "cpu" else []
    # 25 steps an epoch; validation off: the two runs compare their training only
    shared = [*run_settings(opts, work), "trainer=ddp", "trainer.devices=1", *accelerator,
              f"data.num_train={25 * batch}", f"data.batch_size={batch}", "trainer.check_val_every_n_epoch=1000"]  # fmt: skip
    whole, parts = work / "ddp_whole", work / "ddp_parts"
    knet([*shared, "trainer.max_epochs=2", f"hydra.run.dir={whole}"], ROOT, opts.time_limit)
    knet([*shared, "trainer.max_epochs=1", f"hydra.run.dir={parts}"], ROOT, opts.time_limit)
    knet([*shared, "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={parts}"], ROOT, opts.time_limit)
    a, b = (load_checkpoint_file(d / "checkpoints" / "last.ckpt") for d in (whole, parts))
    diff = max((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item()
               for k in a["state_dict"] if a["state_dict"][k].is_floating_point())  # fmt: skip
    return {"steps": [a["global_step"], b["global_step"]], "max_weight_diff": diff, "exact": diff == 0.0,
            "loss_whole": losses(whole)[-1], "loss_resumed": losses(parts)[-1],
            "backend": "nccl" if opts.device == "cuda" else "gloo"}  # fmt: skip


def step_device_paths(opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The sparse and dense merges and the fused AdamW on ``--device`` against the CPU (on the CPU:
    the fused AdamW against the for-loop one, and the dense merge's two folds)."""
    import torch

    from knet_lightning.postprocess.merge import _merge_dense
    from knet_lightning.postprocess.sparse_merge import merge_sparse

    device = torch.device(opts.device)
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 64, 96, generator=gen) ** 4
    scores = torch.rand(50, generator=gen)
    args = ((240, 376), (256, 384), (480, 752), 0.5)
    cpu_owner, cpu_area = merge_sparse(probs, scores, *args)
    owner, area = merge_sparse(probs.to(device), scores.to(device), *args)
    merge = {
        "owner_equal": bool(torch.equal(owner.cpu(), cpu_owner)),
        "areas_equal": bool(torch.equal(area.cpu(), cpu_area)),
    }
    # the dense merge: the device's chunk-wide fold (its default) against the map-by-map fold (the
    # CPU's default) on the same device, which must agree exactly; and against the CPU, whose
    # bilinear resize may round differently, as the share of pixels with the same owner
    logits = torch.logit(probs.clamp(1e-4, 1 - 1e-4))
    on_device = (logits.to(device), scores.to(device), *args)
    chunked = _merge_dense(*on_device, prune=False, by_map=False)
    by_map = _merge_dense(*on_device, prune=False, by_map=True)
    cpu_dense = _merge_dense(logits, scores, *args, prune=False)
    dense = {
        "folds_equal": bool(torch.equal(chunked[0], by_map[0]) and torch.equal(chunked[1], by_map[1])),
        "owner_agreement_with_cpu": (chunked[0].cpu() == cpu_dense[0]).float().mean().item(),
    }

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.Conv2d(16, 8, 1))
    reference = [p.detach().clone() for p in net.parameters()]
    grads = [[torch.randn(p.shape, generator=gen) for p in reference] for _ in range(10)]

    def adamw(params: list[torch.Tensor], where: torch.device, **flags: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(p.clone().to(where)) for p in params]
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, **flags)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.to(where)
            optimizer.step()
        return [p.detach().cpu() for p in params]

    fused = adamw(reference, device, fused=True)
    baseline = adamw(reference, torch.device("cpu"), foreach=False)
    diff = max((a - b).abs().max().item() for a, b in zip(fused, baseline))
    return {
        "device": str(device),
        "sparse_merge": merge,
        "dense_merge": dense,
        "fused_adamw_max_diff": diff,
        "fused_adamw_close": diff < 1e-5,
    }


STEPS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "bench": step_bench,
    "train": step_train,
    "ddp_resume": step_ddp_resume,
    "device_paths": step_device_paths,
}


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
                            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gb": props.total_memory / 2**30, "nccl": torch.cuda.nccl.version()}
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="ResNet-18, 64x64, a few steps (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--time-limit", type=float, default=420, help="seconds per subprocess")
    opts = parser.parse_args(argv)
    record: dict[str, Any] = {"machine": machine(opts.device), "tiny": opts.tiny, "steps": {}}
    failed = []
    for name in opts.steps:
        start = time.perf_counter()
        try:
            result = STEPS[name](opts, opts.workdir) | {"ok": True}
        except Exception as err:  # the other steps still run; the JSON says what failed and why
            result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            failed.append(name)
        result["seconds"] = time.perf_counter() - start
        record["steps"][name] = result
        opts.out.write_text(json.dumps(record, indent=2))  # after each step: an interrupted run keeps its figures
        print(f"{name}: {'ok' if result['ok'] else 'FAILED: ' + result['error'][:300]} ({result['seconds']:.0f} s)")
    print(f"wrote {opts.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
