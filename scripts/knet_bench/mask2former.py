"""The mask2former section: the Hugging Face ``transformers`` Mask2Former (ResNet backbone,
random weights, built from its config, nothing downloaded) at the knet section's sizes and
batches, reported as ratios K-Net / Mask2Former."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .common import NUM_CLASSES, Context, Profile, count_params, make_batch
from .model import autocast
from .timing import PartTimer, PeakMemory, measure, part_of


def build_mask2former(profile: Profile, device: torch.device, seed: int) -> nn.Module:
    """Mask2Former (HF transformers) with a ResNet backbone, random weights, from its config."""
    import inspect

    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    from transformers.utils import logging as hf_logging

    # A ResNet backbone draws a "not a supported model" warning; it works (see the smoke test).
    hf_logging.set_verbosity_error()
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if profile.m2f_tiny:
        backbone = ResNetConfig(
            embedding_size=16,
            hidden_sizes=[16, 32, 64, 128],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            out_features=stages,
        )
        sizes: dict[str, Any] = dict(
            feature_size=32,
            mask_feature_size=32,
            hidden_dim=32,
            encoder_feedforward_dim=64,
            dim_feedforward=64,
            encoder_layers=1,
            decoder_layers=2,
            num_attention_heads=2,
            train_num_points=256,
        )
    else:
        backbone = ResNetConfig(
            embedding_size=64,
            hidden_sizes=[256, 512, 1024, 2048],
            depths=[3, 4, 6, 3],
            layer_type="bottleneck",
            out_features=stages,
        )
        sizes = {}
    params = inspect.signature(Mask2FormerConfig.__init__).parameters
    if "use_pretrained_backbone" in params:  # transformers 4.x; 5.x never loads backbone weights here
        sizes["use_pretrained_backbone"] = False
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=NUM_CLASSES, num_queries=profile.m2f_queries, **sizes
    )
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(config).to(device)


def m2f_steps(
    model: nn.Module,
    processor: Any,
    images: torch.Tensor,
    targets: list[dict[str, Any]],
    size: tuple[int, int],
    timer: PartTimer | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Mask2Former's inference (forward + its panoptic post-processing, the ``postprocess`` part
    of ``timer``) and training step (forward with its own loss + backward + AdamW), as the bench
    times them; forward and loss under ``amp_dtype`` autocast, as K-Net's (``--amp``)."""
    mask_labels = [t["masks"].float() for t in targets]
    class_labels = [t["labels"] for t in targets]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    part = part_of(timer)

    def infer() -> None:
        with torch.inference_mode():
            with autocast(images.device, amp_dtype):
                out = model(pixel_values=images)
            with part("postprocess"):
                processor.post_process_panoptic_segmentation(out, target_sizes=[size] * images.shape[0])

    def train() -> None:
        with autocast(images.device, amp_dtype):
            out = model(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return infer, train


def section_mask2former(ctx: Context) -> dict[str, Any]:
    """Mask2Former inference and train step at the ``knet`` section's sizes and batches."""
    try:
        import transformers
        from transformers import Mask2FormerImageProcessor
    except ImportError as e:
        return {
            "status": "skipped",
            "reason": f"transformers is not importable ({e}); install the bench extra: pip install -e '.[bench]'",
            "rows": [],
        }
    p, device = ctx.profile, ctx.device
    model = build_mask2former(p, device, ctx.seed)
    processor = Mask2FormerImageProcessor()
    params, _ = count_params(model)
    knet_rows = {
        (r["size"], r["batch"], r["mode"]): r for r in ctx.results.get("sections", {}).get("knet", {}).get("rows", [])
    }
    rows: list[dict[str, Any]] = []
    for size in p.sizes:
        for batch in p.batches:
            images, targets = make_batch(p, size, batch, device, ctx.seed)
            key = f"{size[0]}x{size[1]}"

            infer, train = m2f_steps(model, processor, images, targets, size, amp_dtype=ctx.amp_dtype)

            for mode, step in (("inference", infer), ("train", train)):
                model.train(mode == "train")
                with PeakMemory(device) as mem:
                    res = measure(step, device, p.warmup, p.repeats)
                knet = knet_rows.get((key, batch, mode))
                rows.append(
                    {
                        "size": key,
                        "batch": batch,
                        "mode": mode,
                        "m2f_ms": res["total_ms"],
                        "m2f_runs_ms": res["runs_ms"],
                        "knet_ms": knet["total_ms"] if knet else None,
                        "ratio_knet_over_m2f": knet["total_ms"] / res["total_ms"] if knet else None,
                        **{f"m2f_{k}": v for k, v in mem.result().items()},
                    }
                )
            del infer, train, images, targets
            gc.collect()
    notes = [
        f"transformers {transformers.__version__}; Mask2Former with a ResNet backbone "
        f"({'tiny' if p.m2f_tiny else 'R50'}), {p.m2f_queries} queries, {params / 1e6:.1f} M params, random weights",
        "inference = forward + Mask2FormerImageProcessor.post_process_panoptic_segmentation; train = forward with "
        "its own loss (mask_labels / class_labels, point-sampled) + backward + AdamW step",
        "ratio < 1: K-Net is faster",
        f"precision: {'bf16 autocast of both models' if ctx.amp_dtype is not None else 'fp32'}",
    ]
    if not knet_rows:
        notes.append("the knet section did not run in this invocation: no ratios")
    return {"model": {"params": params, "num_queries": p.m2f_queries}, "rows": rows, "notes": notes}
