"""Per-component profile of K-Net Swin-L against Hugging Face Mask2Former Swin-L (issue 30, item 1).

    python scripts/profile_swin_l.py [--sizes 512x512 800x1216] [--threads 2] [--out profile_swin_l.json]

For each size, random weights, median of ``--repeats`` after one warm-up run, in one process;
forward only under ``inference_mode`` except ``knet-train``:

- ``knet``: K-Net Swin-L (window 7, the bench's ``zoo`` model) by component (backbone, FPN + neck,
  kernel head, update stages) from forward hooks, in NCHW and in channels-last (the bench's
  layout on an AVX-512 CPU), and the panoptic post-processing of the bench's inference step;
- ``knet-train`` (not in the default run): K-Net Swin-L's training step by part (forward
  components from hooks, backward and AdamW step as wholes), the bench's ``zoo`` step;
- ``mask2former``: HF Mask2Former Swin-L (window 12) by component (backbone, pixel decoder,
  transformer decoder);
- ``backbones``: our ``SwinBackbone`` alone against ``transformers``' ``SwinBackbone`` with the
  same configuration (Swin-L, window 7) and with Mask2Former's (window 12), one forward of each in
  turn per round (median and minimum over the rounds). Times do not depend on the weights'
  values, so each has its own random ones;
- ``ratios`` (not in the default run): K-Net Swin-L against Mask2Former Swin-L, inference and
  training step as the bench's ``zoo`` times them, one step of each per round (median of the
  per-round ratios): the issue's target ratios without the host's drift between the zoo's rows.

Prints a table and writes the JSON (needs the ``bench`` extra: ``pip install -e '.[bench]'``).
``--tiny`` (Swin-T, the bench's tiny Mask2Former; ``--sizes 64x64``) is the smoke test of
``tests/test_bench.py``; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from knet_bench.common import PROFILES, TRAIN_PARTS, Context, make_batch  # noqa: E402
from knet_bench.mask2former import m2f_steps  # noqa: E402
from knet_bench.model import (  # noqa: E402
    attach_knet,
    build_knet,
    in_layout,
    knet_infer_step,
    knet_train_step,
    make_optimizer,
)
from knet_bench.timing import PartTimer, breakdown, measure, per_round_ratio, round_robin  # noqa: E402
from knet_bench.zoo import build_mask2former_swin, mask2former_swin_name, zoo_models  # noqa: E402

from knet_lightning.module import KNetModule  # noqa: E402


def knet_swin(ctx: Context) -> tuple[str, KNetModule]:
    """The bench's ``zoo`` K-Net Swin-L (tiny profile: Swin-T), random weights, and its name."""
    name = "Swin-T" if ctx.profile.name == "tiny" else "Swin-L"
    return name, build_knet(ctx, ctx.profile.num_proposals, ctx.profile.num_stages, **zoo_models(ctx.profile)[name])


def knet_rows(ctx: Context, size: tuple[int, int], repeats: int) -> list[dict[str, Any]]:
    name, module = knet_swin(ctx)
    module.eval()
    images, _ = make_batch(ctx.profile, size, 1, ctx.device, ctx.seed)
    rows = []
    for layout in ("nchw", "channels-last"):
        ctx.memory_format = layout
        x = in_layout(ctx, module, images, training=False)
        timer = PartTimer(ctx.device)
        attach_knet(timer, module)

        def step(x: torch.Tensor = x, timer: PartTimer = timer) -> None:
            with torch.inference_mode():
                last = module(x)[-1]
                with timer.part("postprocess"):
                    module.task.postprocess(last, 0, size, size, size)

        result = measure(step, ctx.device, 1, repeats, timer)
        timer.remove()
        parts = result["parts_ms"]
        parts["other"] = result["parts_total_ms"] - sum(parts.values())
        rows.append({"model": f"K-Net {name}", "layout": layout, "total_ms": result["total_ms"],
                     "forward_ms": result["parts_total_ms"] - parts["postprocess"], "parts_ms": parts})  # fmt: skip
    return rows


def knet_train_row(ctx: Context, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    """K-Net Swin-L's training step (the bench's: forward, matching, losses, backward, AdamW) by
    part, in the bench's layout for training on this CPU."""
    name, module = knet_swin(ctx)
    module.train()
    images, targets = make_batch(ctx.profile, size, 1, ctx.device, ctx.seed)
    ctx.memory_format = "auto"
    images = in_layout(ctx, module, images, training=True)
    timer = PartTimer(ctx.device)
    attach_knet(timer, module)
    step = knet_train_step(module, make_optimizer(module), images, targets, timer)
    result = measure(step, ctx.device, 1, repeats, timer)
    timer.remove()
    return {"model": f"K-Net {name} training step", "total_ms": result["total_ms"],
            "parts_ms": breakdown(result, TRAIN_PARTS)}  # fmt: skip


def mask2former_row(ctx: Context, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    model = build_mask2former_swin(ctx.profile, ctx.device, ctx.seed).eval()
    images, _ = make_batch(ctx.profile, size, 1, ctx.device, ctx.seed)
    timer = PartTimer(ctx.device)
    inner = model.model
    timer.attach(inner.pixel_level_module.encoder, "backbone")
    timer.attach(inner.pixel_level_module.decoder, "pixel_decoder")
    timer.attach(inner.transformer_module, "transformer_decoder")

    def step() -> None:
        with torch.inference_mode():
            model(pixel_values=images)

    result = measure(step, ctx.device, 1, repeats, timer)
    parts = result["parts_ms"]
    parts["other"] = result["parts_total_ms"] - sum(parts.values())
    return {"model": mask2former_swin_name(ctx.profile), "total_ms": result["total_ms"], "parts_ms": parts}


def backbone_rows(ctx: Context, size: tuple[int, int], repeats: int) -> list[dict[str, Any]]:
    from transformers import SwinBackbone, SwinConfig

    from knet_lightning.models.swin import SwinBackbone as OurSwin

    images, _ = make_batch(ctx.profile, size, 1, ctx.device, ctx.seed)
    rows = []
    tiny = ctx.profile.name == "tiny"
    ours = OurSwin(arch="tiny" if tiny else "large", window_size=7, drop_path_rate=0.0).to(ctx.device).eval()
    candidates: list[tuple[str, Any]] = [("ours (window 7)", lambda: ours(images))]
    dims = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]) if tiny else \
        dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48])  # fmt: skip
    for window in (7, 12):
        config = SwinConfig(**dims, window_size=window, out_features=["stage1", "stage2", "stage3", "stage4"])
        hf = SwinBackbone(config).to(ctx.device).eval()
        candidates.append((f"transformers SwinBackbone (window {window})", lambda hf=hf: hf(images)))
    with torch.inference_mode():
        timed = round_robin(candidates, ctx.device, repeats)
    for name, result in timed.items():
        rows.append({"backbone": name, **result})
    return rows


def ratio_rows(ctx: Context, size: tuple[int, int], repeats: int, settle: int = 1) -> dict[str, Any]:
    """K-Net Swin-L against Mask2Former Swin-L as the bench's ``zoo`` times them (inference with
    each one's panoptic post-processing; training step with each one's loss, backward and AdamW),
    one step of each per round, inference rounds first: the ratios the issue's targets name, free
    of the host's drift between the zoo's back-to-back rows. ``settle`` untimed steps precede each
    timed one, so each model is timed in its own steady state, as the zoo times it alone."""
    from transformers import Mask2FormerImageProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its post-processing warns on every call
    name, knet = knet_swin(ctx)
    m2f = build_mask2former_swin(ctx.profile, ctx.device, ctx.seed)
    images, targets = make_batch(ctx.profile, size, 1, ctx.device, ctx.seed)
    ctx.memory_format = "auto"
    knet.eval()
    m2f.eval()
    m2f_infer, m2f_train = m2f_steps(m2f, Mask2FormerImageProcessor(), images, targets, size)
    knet_infer = knet_infer_step(knet, in_layout(ctx, knet, images, training=False), None)
    infer = round_robin([("knet", knet_infer), ("mask2former", m2f_infer)], ctx.device, repeats, settle)
    knet.train()
    m2f.train()
    knet_train = knet_train_step(knet, make_optimizer(knet), in_layout(ctx, knet, images, training=True), targets, None)
    train = round_robin([("knet", knet_train), ("mask2former", m2f_train)], ctx.device, repeats, settle)
    row: dict[str, Any] = {"model": f"K-Net {name} / {mask2former_swin_name(ctx.profile)}"}
    for kind, timed in (("infer", infer), ("train", train)):
        row[f"knet_{kind}_ms"], row[f"m2f_{kind}_ms"] = timed["knet"]["total_ms"], timed["mask2former"]["total_ms"]
        row[f"knet_{kind}_runs_ms"], row[f"m2f_{kind}_runs_ms"] = (
            timed["knet"]["runs_ms"],
            timed["mask2former"]["runs_ms"],
        )
        row[f"{kind}_ratio"] = per_round_ratio(timed, "knet", "mask2former")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "800x1216"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", nargs="+", default=["knet", "mask2former", "backbones"],
                        choices=["knet", "knet-train", "mask2former", "backbones", "ratios"])  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("profile_swin_l.json"))
    parser.add_argument("--tiny", action="store_true", help="Swin-T and the bench's tiny Mask2Former (a smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Context(profile=PROFILES["tiny" if args.tiny else "full"], device=torch.device("cpu"), seed=0, results={})
    record: dict[str, Any] = {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
                              "torch": torch.__version__, "sizes": {}}  # fmt: skip
    for text in args.sizes:
        size = tuple(int(v) for v in text.split("x"))
        entry: dict[str, Any] = {}
        if "knet" in args.sections:
            entry["knet"] = knet_rows(ctx, size, args.repeats)
        if "knet-train" in args.sections:
            entry["knet_train"] = knet_train_row(ctx, size, args.repeats)
        if "mask2former" in args.sections:
            entry["mask2former"] = mask2former_row(ctx, size, args.repeats)
        if "backbones" in args.sections:
            entry["backbones"] = backbone_rows(ctx, size, args.repeats)
        if "ratios" in args.sections:
            entry["ratios"] = ratio_rows(ctx, size, args.repeats)
        record["sizes"][text] = entry
        args.out.write_text(json.dumps(record, indent=2))
        singles = [entry[k] for k in ("knet_train", "mask2former") if k in entry]
        for row in entry.get("knet", []) + singles:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in row["parts_ms"].items())
            print(f"{text} {row['model']} {row.get('layout', '')}: {row['total_ms']:.0f} ms ({parts})")
        for row in entry.get("backbones", []):
            print(f"{text} backbone {row['backbone']}: {row['total_ms']:.0f} ms (min {row['min_ms']:.0f})")
        if "ratios" in entry:
            r = entry["ratios"]
            print(f"{text} {r['model']}: inference {r['knet_infer_ms']:.0f} / {r['m2f_infer_ms']:.0f} ms "
                  f"({r['infer_ratio']:.2f}x), training step {r['knet_train_ms']:.0f} / {r['m2f_train_ms']:.0f} ms "
                  f"({r['train_ratio']:.2f}x)")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
