"""Deformable convolution on the CPU: torchvision's ``deform_conv2d`` against bilinear sampling +
matmul (:func:`knet_lightning.models.dcn.sampled_deform_conv2d`, what ``DeformConv2dPack`` runs on
the CPU), and K-Net R101-DCN against R50 (issue 30, item 3).

    python scripts/bench_dcn.py [--threads 2] [--size 512] [--out bench_dcn.json]
    python scripts/bench_dcn.py --tiny          # small shapes, a smoke test (tests/test_dcn.py)

``ops``: the 3x3 convs of R101-DCN's c3-c5 at ``--size`` (batch 1, offsets of a few pixels):
forward and forward + backward (input, offsets and weight gradients) of both, and their largest
relative difference. ``models``: K-Net R50 and R101-DCN panoptic (the bench's ``zoo`` models)
inference (forward + post-processing) and training step (forward, losses, backward, AdamW), fp32,
median of ``--repeats`` rounds after one warm-up round, one step of each model per round (a
shared host drifts by +-20% over minutes; this way the ratio holds), and R101-DCN's ratios to R50
as the median of the per-round ratios. Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(step: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``step`` over ``repeats`` runs after one warm-up (the bench's measure)."""
    from knet_bench.timing import measure

    return measure(step, torch.device("cpu"), 1, repeats)["total_ms"]


def op_rows(size: int, repeats: int, tiny: bool) -> list[dict[str, Any]]:
    from torchvision.ops import deform_conv2d

    from knet_lightning.models.dcn import sampled_deform_conv2d

    # (stage, channels, input side, stride): the first block of c3 strides, as R101-DCN's does
    shapes = [
        ("c3", 128, size // 4, 2),
        ("c3", 128, size // 8, 1),
        ("c4", 256, size // 16, 1),
        ("c5", 512, size // 32, 1),
    ]
    if tiny:
        shapes = [("c3", 8, 16, 2), ("c4", 16, 8, 1)]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for stage, channels, side, stride in shapes:
        out_side = (side - 1) // stride + 1
        x = torch.randn(1, channels, side, side, generator=gen).requires_grad_()
        offset = (2 * torch.randn(1, 18, out_side, out_side, generator=gen)).requires_grad_()
        weight = (0.01 * torch.randn(channels, channels, 3, 3, generator=gen)).requires_grad_()
        ops = {
            "torchvision": lambda x=x, o=offset, w=weight, s=stride: deform_conv2d(x, o, w, stride=s, padding=1),
            "sampled": lambda x=x, o=offset, w=weight, s=stride: sampled_deform_conv2d(x, o, w, (s, s), (1, 1), (1, 1)),
        }  # fmt: skip
        row: dict[str, Any] = {"stage": stage, "channels": channels, "input": side, "stride": stride}
        for name, op in ops.items():
            with torch.no_grad():
                row[f"{name}_forward_ms"] = timed(op, repeats)
            inputs, grad = (x, offset, weight), torch.ones(1, channels, out_side, out_side)
            row[f"{name}_train_ms"] = timed(lambda op=op, i=inputs, g=grad: torch.autograd.grad(op(), i, g), repeats)
        a, b = ops["torchvision"](), ops["sampled"]()
        row["max_rel_diff"] = ((a - b).abs().max() / a.abs().max()).item()
        rows.append(row)
    return rows


def model_rows(size: int, repeats: int, tiny: bool) -> list[dict[str, Any]]:
    from knet_bench.common import PROFILES, Context, make_batch
    from knet_bench.model import build_knet, knet_infer_step, knet_train_step, make_optimizer
    from knet_bench.timing import per_round_ratio, round_robin
    from knet_bench.zoo import zoo_models

    profile = PROFILES["tiny" if tiny else "full"]
    ctx = Context(profile=profile, device=torch.device("cpu"), seed=0, results={})
    models = zoo_models(profile)
    names = ["R50-DCN (1/4 width)"] if tiny else ["R50", "R101-DCN"]
    images, targets = make_batch(profile, (size, size), 1, ctx.device, ctx.seed)
    modules = {name: build_knet(ctx, profile.num_proposals, profile.num_stages, **models[name]) for name in names}
    # one step of each model per round, so that the R101-DCN / R50 ratios survive the host's drift
    for module in modules.values():
        module.eval()
    infer = round_robin([(n, knet_infer_step(m, images, None)) for n, m in modules.items()], ctx.device, repeats)
    for module in modules.values():
        module.train()
    steps = [(n, knet_train_step(m, make_optimizer(m), images, targets, None)) for n, m in modules.items()]
    train = round_robin(steps, ctx.device, repeats)
    rows = []
    for name in names:
        row = {"model": f"K-Net {name}", "size": size, "infer_ms": infer[name]["total_ms"],
               "train_ms": train[name]["total_ms"], "infer_runs_ms": infer[name]["runs_ms"],
               "train_runs_ms": train[name]["runs_ms"]}  # fmt: skip
        for kind, timed in (("infer", infer), ("train", train)):  # against the first model, per round
            row[f"{kind}_ratio"] = per_round_ratio(timed, name, names[0])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", nargs="+", choices=("ops", "models"), default=["ops", "models"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_dcn.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = 64 if args.tiny else args.size
    record: dict[str, Any] = {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
                              "torch": torch.__version__}  # fmt: skip
    if "ops" in args.sections:
        record["ops"] = op_rows(size, args.repeats, args.tiny)
        print(f"{'conv':<16} {'fwd tv':>8} {'fwd ours':>9} {'f+b tv':>8} {'f+b ours':>9} {'rel diff':>9}")
        for r in record["ops"]:
            print(f"{r['stage']} {r['channels']}@{r['input']}/s{r['stride']:<4} {r['torchvision_forward_ms']:>8.1f} "
                  f"{r['sampled_forward_ms']:>9.1f} {r['torchvision_train_ms']:>8.1f} {r['sampled_train_ms']:>9.1f} "
                  f"{r['max_rel_diff']:>9.1e}")  # fmt: skip
    if "models" in args.sections:
        record["models"] = model_rows(size, args.repeats, args.tiny)
        for r in record["models"]:
            first = record["models"][0]["model"]
            print(f"{r['model']} {r['size']}x{r['size']}: inference {r['infer_ms']:.0f} ms ({r['infer_ratio']:.2f}x "
                  f"{first}), train step {r['train_ms']:.0f} ms ({r['train_ratio']:.2f}x)")  # fmt: skip
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
