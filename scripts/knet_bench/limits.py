"""The hardware's limits, measured in the same run as the models they judge.

A square ``torch.mm`` in fp32 and in bf16 (AMX or AVX-512 BF16 on a CPU that has them; on one
without, bf16 is emulated and slow, which the figure then shows) and a 256-channel 3x3
convolution in fp32: the rates a model's GFLOP/s is read against (``zoo`` section). The median of
a few runs after one warm-up, in GFLOP/s (a multiply-add counts 2 FLOPs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .timing import measure


def _rate(flops: float, step: Any, device: torch.device, repeats: int) -> float:
    return flops / (measure(step, device, 1, repeats)["total_ms"] * 1e6)


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """GFLOP/s of an ``(n, n) @ (n, n)`` product in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def step() -> None:
        with torch.inference_mode():
            torch.mm(a, b)

    return _rate(2.0 * n**3, step, device, repeats)


def conv_rate(channels: int, side: int, device: torch.device, repeats: int = 3) -> float:
    """GFLOP/s of a ``channels -> channels`` 3x3 convolution over a ``side x side`` map, channels-last."""
    x = torch.randn(1, channels, side, side, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, device=device).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode():
            F.conv2d(x, w, padding=1)

    return _rate(2.0 * channels * channels * 9 * side * side, step, device, repeats)


def measure_limits(device: torch.device, tiny: bool) -> dict[str, Any]:
    """``{"matmul_fp32", "matmul_bf16", "conv_fp32"}`` in GFLOP/s and the sizes they were measured at."""
    n, side = (512, 32) if tiny else (4096, 128)
    return {
        "matmul_size": n,
        "conv": f"256 -> 256, 3x3, {side}x{side}",
        "matmul_fp32": matmul_rate(n, torch.float32, device),
        "matmul_bf16": matmul_rate(n, torch.bfloat16, device),
        "conv_fp32": conv_rate(256, side, device),
    }
