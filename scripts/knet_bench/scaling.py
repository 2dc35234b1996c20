"""The scaling section: params, GFLOPs, inference latency and train step over the number of
proposals N and update stages S, batch 1."""

from __future__ import annotations

import gc
from typing import Any

from knet_lightning.runtime.sweep import model_complexity

from .common import Context, make_batch
from .model import build_knet, in_layout, knet_infer_step, knet_train_step, make_optimizer
from .timing import measure


def section_scaling(ctx: Context) -> dict[str, Any]:
    """Params, GFLOPs, inference latency and train step over (N, S), batch 1."""
    p, device = ctx.profile, ctx.device
    rows: list[dict[str, Any]] = []
    batch_images, targets = make_batch(p, p.grid_size, 1, device, ctx.seed)
    for n, s in p.grid:
        module = build_knet(ctx, n, s).eval()
        images = in_layout(ctx, module, batch_images, training=False)
        # The package's count (params of the network, FLOPs of one forward of one image), as
        # the training runs log it; the forward doubles as the first warm-up.
        complexity = model_complexity(module.net, images)
        infer = measure(knet_infer_step(module, images, None, ctx.amp_dtype), device, p.warmup, p.repeats)
        row: dict[str, Any] = {
            "num_proposals": n,
            "num_stages": s,
            "params_m": complexity["params_m"],
            "gflops": complexity["gflops"],
            "infer_ms": infer["total_ms"],
            "train_ms": None,
        }
        if (n, s) in p.grid_train:
            images = in_layout(ctx, module, images, training=True)
            module.train()
            step = knet_train_step(module, make_optimizer(module, ctx.optimizer), images, targets, None, ctx.amp_dtype)
            row["train_ms"] = measure(step, device, p.warmup, p.repeats)["total_ms"]
            del step
        rows.append(row)
        del module, images
        gc.collect()
    return {
        "size": f"{p.grid_size[0]}x{p.grid_size[1]}",
        "rows": rows,
        "notes": [
            "GFLOPs: torch.utils.flop_counter on one forward pass of one image (a multiply-add counts 2 FLOPs; "
            "papers often quote multiply-adds), without post-processing",
            "infer_ms: forward + post-processing, batch 1; train_ms: forward + matching + losses + backward + "
            "AdamW step, batch 1 (only the points listed in the profile's grid_train)",
        ],
    }
