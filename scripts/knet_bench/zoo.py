"""The zoo section: the paper's large panoptic models side by side, batch 1 at the profile's sizes.

K-Net R50 (the reference), R101-DCN (deformable convs in c3-c5) and Swin-L (window 7), each with
N=100, S=3 and the COCO classes: parameters, GFLOPs of one forward, inference (forward +
panoptic post-processing) and training step (forward + matching + losses + backward + AdamW),
with peak memory. In the same run, where ``transformers`` is importable and memory allows, the
Hugging Face Mask2Former with a Swin-L backbone (window 12 and 200 queries, its published COCO
panoptic setting; random weights, built from its config, nothing downloaded). The ``--tiny``
profile swaps in a quarter-width R50-DCN and a Swin-T at 64x64 (smoke test only).

Fewer repeats than the other sections (one warm-up, at most 3 timed runs): a Swin-L training
step at 800x1216 takes tens of seconds on a 2-core CPU.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from knet_lightning.runtime.sweep import model_complexity

from .common import NUM_CLASSES, Context, Profile, count_params, make_batch
from .limits import measure_limits
from .mask2former import m2f_steps
from .model import build_knet, in_layout, knet_infer_step, knet_train_step, make_optimizer
from .timing import PartTimer, PeakMemory, measure

DCN_C3_C5 = (False, True, True, True)


def zoo_models(profile: Profile) -> dict[str, dict[str, Any]]:
    """Model name -> KNet backbone arguments for this profile."""
    if profile.name == "tiny":
        return {
            "R50-DCN (1/4 width)": {
                "backbone_depth": 50,
                "backbone_base_channels": 16,
                "backbone_dcn_stages": DCN_C3_C5,
            },
            "Swin-T": {"backbone_type": "swin", "swin_arch": "tiny", "frozen_stages": -1},
        }
    return {
        "R50": {"backbone_depth": 50},
        "R101-DCN": {"backbone_depth": 101, "backbone_dcn_stages": DCN_C3_C5},
        "Swin-L": {
            "backbone_type": "swin",
            "swin_arch": "large",
            "swin_window_size": 7,
            "drop_path_rate": 0.2,
            "frozen_stages": -1,
        },  # fmt: skip
    }


def mask2former_swin_name(profile: Profile) -> str:
    """The row name of :func:`build_mask2former_swin`'s model."""
    return "Mask2Former Swin (HF, tiny)" if profile.name == "tiny" else "Mask2Former Swin-L (HF)"


def build_mask2former_swin(profile: Profile, device: torch.device, seed: int) -> nn.Module:
    """Hugging Face Mask2Former with a Swin backbone (Swin-L, window 12; tiny: a 1-block Swin), random weights."""
    import inspect

    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if profile.name == "tiny":
        backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                              out_features=stages)  # fmt: skip
        sizes: dict[str, Any] = dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
                                     dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                                     train_num_points=256)  # fmt: skip
    else:
        backbone = SwinConfig(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12,
                              drop_path_rate=0.3, out_features=stages)  # fmt: skip
        sizes = {}
    if "use_pretrained_backbone" in inspect.signature(Mask2FormerConfig.__init__).parameters:
        sizes["use_pretrained_backbone"] = False
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=NUM_CLASSES, num_queries=profile.m2f_queries,
                               **sizes)  # fmt: skip
    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(config).to(device)


def _repeats(profile: Profile) -> tuple[int, int]:
    return min(profile.warmup, 1), min(profile.repeats, 3)


def _timed_inference(row: dict[str, Any], step: Any, timer: PartTimer, device: torch.device,
                     warmup: int, repeats: int) -> None:  # fmt: skip
    """``infer_ms`` (forward + post-processing, median) and ``forward_ms`` (the median run less
    its post-processing) into ``row``, with the peak memory."""
    with PeakMemory(device) as mem:
        result = measure(step, device, warmup, repeats, timer)
    row["infer_ms"] = result["total_ms"]
    row["forward_ms"] = result["parts_total_ms"] - result["parts_ms"].get("postprocess", 0.0)
    row["infer_peak_mb"] = mem.result().get("peak_mb")


def _rates(row: dict[str, Any], limit: float) -> None:
    """GFLOP/s of the forward and its fraction of ``limit``, the run's measured matmul rate."""
    if row.get("gflops") and row.get("forward_ms"):
        row["gflops_per_s"] = row["gflops"] / (row["forward_ms"] / 1e3)
        row["fraction_of_matmul"] = row["gflops_per_s"] / limit


def _knet_rows(ctx: Context, name: str, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    p, device = ctx.profile, ctx.device
    warmup, repeats = _repeats(p)
    module = build_knet(ctx, p.num_proposals, p.num_stages, **kwargs)
    params, trainable = count_params(module.net)
    rows = []
    for size in p.sizes:
        images, targets = make_batch(p, size, 1, device, ctx.seed)
        images = in_layout(ctx, module, images, training=False)
        module.eval()
        complexity = model_complexity(module.net, images)
        row: dict[str, Any] = {
            "model": f"K-Net {name}", "size": f"{size[0]}x{size[1]}", "params_m": params / 1e6,
            "trainable_m": trainable / 1e6, "gflops": complexity["gflops"],
        }  # fmt: skip
        timer = PartTimer(device)
        _timed_inference(row, knet_infer_step(module, images, timer, ctx.amp_dtype), timer, device, warmup, repeats)
        images = in_layout(ctx, module, images, training=True)
        module.train()
        optimizer = make_optimizer(module, ctx.optimizer)
        with PeakMemory(device) as mem:
            train = measure(knet_train_step(module, optimizer, images, targets, None, ctx.amp_dtype), device,
                            warmup, repeats)  # fmt: skip
        rows.append({**row, "train_ms": train["total_ms"], "train_peak_mb": mem.result().get("peak_mb")})
        del optimizer, images, targets
        gc.collect()
    del module
    gc.collect()
    return rows


def _mask2former_rows(ctx: Context) -> tuple[list[dict[str, Any]], str]:
    p, device = ctx.profile, ctx.device
    try:
        import transformers
        from transformers import Mask2FormerImageProcessor
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        return [], f"Mask2Former skipped: transformers is not importable ({e}); pip install -e '.[bench]'"
    hf_logging.set_verbosity_error()
    warmup, repeats = _repeats(p)
    model = build_mask2former_swin(p, device, ctx.seed)
    processor = Mask2FormerImageProcessor()
    params, trainable = count_params(model)
    rows = []
    for size in p.sizes:
        images, targets = make_batch(p, size, 1, device, ctx.seed)
        row: dict[str, Any] = {"model": mask2former_swin_name(p),
                               "size": f"{size[0]}x{size[1]}", "params_m": params / 1e6, "trainable_m": trainable / 1e6}  # fmt: skip
        try:
            model.eval()
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                model(pixel_values=images)
            row["gflops"] = counter.get_total_flops() / 1e9
            timer = PartTimer(device)
            infer, train = m2f_steps(model, processor, images, targets, size, timer, ctx.amp_dtype)
            _timed_inference(row, infer, timer, device, warmup, repeats)
            model.train()
            with PeakMemory(device) as mem:
                row["train_ms"] = measure(train, device, warmup, repeats)["total_ms"]
            row["train_peak_mb"] = mem.result().get("peak_mb")
            del infer, train
        except (RuntimeError, MemoryError) as e:  # out of memory: keep what was measured
            row["note"] = f"stopped: {type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        gc.collect()
    del model
    gc.collect()
    return rows, f"transformers {transformers.__version__}"


def _ratios(rows: list[dict[str, Any]]) -> list[str]:
    """K-Net Swin-L (tiny: Swin-T) over Mask2Former Swin-L, per size: inference and training step."""
    m2f = {r["size"]: r for r in rows if r["model"].startswith("Mask2Former")}
    notes = []
    for row in rows:
        other = m2f.get(row["size"])
        if row["model"].startswith("K-Net Swin") and other and other.get("infer_ms") and other.get("train_ms"):
            notes.append(
                f"{row['model']} / Mask2Former at {row['size']}: inference {row['infer_ms'] / other['infer_ms']:.2f}x, "
                f"forward {row['forward_ms'] / other['forward_ms']:.2f}x, "
                f"training step {row['train_ms'] / other['train_ms']:.2f}x"
            )
    return notes


def section_zoo(ctx: Context) -> dict[str, Any]:
    """K-Net R50 / R101-DCN / Swin-L and Mask2Former Swin-L, batch 1, at the profile's sizes,
    with the hardware's matmul and convolution rates measured first."""
    limits = measure_limits(ctx.device, ctx.profile.name == "tiny")
    dtype = "bf16" if ctx.amp_dtype == torch.bfloat16 else "fp32"
    limit = limits[f"matmul_{dtype}"]
    rows: list[dict[str, Any]] = []
    for name, kwargs in zoo_models(ctx.profile).items():
        rows += _knet_rows(ctx, name, kwargs)
    m2f_rows, m2f_note = _mask2former_rows(ctx)
    rows += m2f_rows
    for row in rows:
        _rates(row, limit)
    warmup, repeats = _repeats(ctx.profile)
    return {
        "rows": rows,
        "limits": limits,
        "notes": [
            f"batch 1, N={ctx.profile.num_proposals} proposals + 53 stuff kernels, S={ctx.profile.num_stages}; "
            f"median of {repeats} runs after {warmup} warm-up; random weights; {dtype}"
            + (" autocast" if dtype == "bf16" else ""),
            "GFLOPs: torch.utils.flop_counter, one forward of one image (a multiply-add is 2 FLOPs); a deformable "
            "conv counts as its convolution plus 4 multiply-adds per bilinear sample",
            "inference = forward + panoptic post-processing; forward = the median inference run less its "
            "post-processing; train = forward + matching + losses + backward + AdamW step (Mask2Former: its own "
            "point-sampled loss)",
            f"GFLOP/s = GFLOPs / forward time; of matmul = that over the {dtype} matmul rate measured in this run: "
            f"torch.mm {limits['matmul_size']}^2 fp32 {limits['matmul_fp32']:.0f} GFLOP/s, bf16 "
            f"{limits['matmul_bf16']:.0f} GFLOP/s; conv {limits['conv']} fp32 {limits['conv_fp32']:.0f} GFLOP/s",
            "peak MB: CPU peak RSS of the process during that measurement (weights included); CUDA: max allocated",
            *_ratios(rows),
            m2f_note,
        ],
    }
