"""The knet section: K-Net R50 panoptic inference and train step per (size, batch), with the
per-part breakdown and peak memory, and the panoptic merge by method."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from knet_lightning.module import KNetModule
from knet_lightning.postprocess.merge import panoptic_inference

from .common import (
    INFER_PARTS,
    NUM_CLASSES,
    NUM_STUFF,
    NUM_THINGS,
    TRAIN_PARTS,
    Context,
    Profile,
    count_params,
    make_batch,
)
from .model import attach_knet, build_knet, in_layout, knet_infer_step, knet_train_step, make_optimizer
from .timing import PartTimer, PeakMemory, breakdown, measure


def confident_outputs(target: dict[str, Tensor], num_proposals: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Stride-4 logits shaped like a trained K-Net's, built from one synthetic target.

    Each ground-truth segment gets a kernel (things: a proposal with a 0.9 class score;
    stuff: its class kernel with a smooth edge), the other proposals repeat a random
    thing's mask with a low score (the duplicates a trained model leaves), and absent stuff
    classes get empty masks. Random-weight outputs are the opposite: no confident pixel,
    so every kernel competes everywhere (the worst case of the sparse merge).

    Returns:
        ``mask_logits`` ``(N, H/4, W/4)`` and ``cls_logits`` ``(N, C)``, N = proposals + stuff.
    """
    masks = target["masks"].float()[:, None]  # (G, 1, H, W)
    soft = F.avg_pool2d(F.avg_pool2d(masks, 4, 4), 3, 1, 1, count_include_pad=False)[:, 0]  # (G, h, w)
    seg_logits = (soft * 16 - 8).clamp(-8, 8)
    labels = target["labels"]
    num_kernels = num_proposals + NUM_STUFF
    mask_logits = torch.full((num_kernels, *seg_logits.shape[1:]), -8.0)
    cls_logits = torch.full((num_kernels, NUM_CLASSES), -6.0)
    things = (labels < NUM_THINGS).nonzero().flatten().tolist()
    slot = 0
    for g, label in enumerate(labels.tolist()):
        noise = torch.randn(seg_logits.shape[1:], generator=gen)
        if label < NUM_THINGS and slot < num_proposals:
            mask_logits[slot], cls_logits[slot, label] = seg_logits[g] + noise, 2.2  # score 0.90
            slot += 1
        elif label >= NUM_THINGS:
            k = num_proposals + label - NUM_THINGS
            mask_logits[k], cls_logits[k, label] = seg_logits[g] + noise, 2.2
    for k in range(slot, num_proposals):
        if things:
            g = things[int(torch.randint(len(things), (1,), generator=gen))]
            mask_logits[k] = seg_logits[g] + torch.randn(seg_logits.shape[1:], generator=gen)
        cls_logits[k, int(torch.randint(NUM_THINGS, (1,), generator=gen))] = -3.0  # score 0.05
    return mask_logits, cls_logits


def postprocess_rows(
    module: KNetModule, images: Tensor, target: dict[str, Tensor], p: Profile, seed: int
) -> list[dict[str, Any]]:
    """One image's panoptic merge by method (dense / sparse) on random-weight and confident outputs."""
    size = tuple(images.shape[-2:])
    net = module.net
    with torch.inference_mode():
        last = module(images[:1])[-1]
    gen = torch.Generator().manual_seed(seed)
    sources = {
        "random-weight model": (last.mask_logits[0].cpu(), last.cls_logits[0].cpu()),
        "confident (trained-like)": confident_outputs({k: v.cpu() for k, v in target.items()}, net.num_proposals, gen),
    }
    rows = []
    for source, (mask_logits, cls_logits) in sources.items():
        mask_logits = mask_logits.to(images.device)
        cls_logits = cls_logits.to(images.device)
        for method in ("dense", "sparse"):

            def merge(method: str = method, mask_logits: Tensor = mask_logits, cls_logits: Tensor = cls_logits) -> None:
                panoptic_inference(
                    mask_logits, cls_logits, net.num_things, net.num_proposals, size, size, size, method=method
                )

            res = measure(merge, images.device, p.warmup, p.repeats)
            rows.append({"size": f"{size[0]}x{size[1]}", "outputs": source, "method": method, "ms": res["total_ms"]})
    return rows


def section_knet(ctx: Context) -> dict[str, Any]:
    """K-Net R50 panoptic: inference and train step per (size, batch), with breakdowns."""
    p, device = ctx.profile, ctx.device
    module = build_knet(ctx, p.num_proposals, p.num_stages)
    params, trainable = count_params(module.net)
    timer = PartTimer(device)
    attach_knet(timer, module)
    rows: list[dict[str, Any]] = []
    merge_rows: list[dict[str, Any]] = []
    try:
        for size in p.sizes:
            for batch in p.batches:
                images, targets = make_batch(p, size, batch, device, ctx.seed)
                base = {"size": f"{size[0]}x{size[1]}", "batch": batch}
                images = in_layout(ctx, module, images, training=False)
                module.eval()
                with PeakMemory(device) as mem:
                    step = knet_infer_step(module, images, timer, ctx.amp_dtype)
                    res = measure(step, device, p.warmup, p.repeats, timer)
                rows.append(_knet_row(base, "inference", res, INFER_PARTS, batch, mem.result()))
                if batch == p.batches[0]:
                    merge_rows += postprocess_rows(module, images, targets[0], p, ctx.seed)
                images = in_layout(ctx, module, images, training=True)
                module.train()
                optimizer = make_optimizer(module, ctx.optimizer)
                with PeakMemory(device) as mem:
                    step = knet_train_step(module, optimizer, images, targets, timer, ctx.amp_dtype)
                    res = measure(step, device, p.warmup, p.repeats, timer)
                rows.append(_knet_row(base, "train", res, TRAIN_PARTS, batch, mem.result()))
                del optimizer, images, targets, step
                gc.collect()
    finally:
        timer.remove()
    return {
        "model": {
            "backbone": f"ResNet-{p.depth}",
            "num_proposals": p.num_proposals,
            "num_stages": p.num_stages,
            "num_classes": NUM_CLASSES,
            "params": params,
            "trainable_params": trainable,
        },
        "rows": rows,
        "postprocess": merge_rows,
        "notes": [
            "inference = forward + panoptic post-processing (output at input size) under torch.inference_mode; "
            f"the post-processing runs method='auto' ({'dense' if device.type == 'cuda' else 'sparse'} here)",
            "post-processing by method: one image's merge of the same outputs; random-weight model = the forward "
            "above, confident = logits built from the synthetic ground truth like a trained model's (segments "
            "with score 0.9, duplicate proposals with 0.05)",
            "train = forward + matching + losses + backward + AdamW step; random weights, synthetic targets "
            f"with {p.scene[0]} things + {p.scene[1]} stuff segments per image",
            "other = total - sum of the measured parts (stage-output upsampling, loss sum, Python overhead)",
            "peak MB: CPU peak RSS of the process during the configuration (weights included); delta MB: peak minus "
            "the RSS at its start (freed heap is returned with malloc_trim first, but memory the allocators still "
            "hold can hide part of the growth); CUDA: max_memory_allocated and its growth",
        ],
    }


def _knet_row(
    base: dict[str, Any], mode: str, res: dict[str, Any], order: Sequence[str], batch: int, mem: dict[str, Any]
) -> dict[str, Any]:
    return {
        **base,
        "mode": mode,
        "total_ms": res["total_ms"],
        "min_ms": res["min_ms"],
        "runs_ms": res["runs_ms"],
        "images_per_s": batch / (res["total_ms"] / 1e3),
        "breakdown_total_ms": res["parts_total_ms"],
        "parts_ms": breakdown(res, order),
        **mem,
    }
