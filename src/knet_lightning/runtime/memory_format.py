"""The network's memory format (``model.channels_last``): which layout is faster where.

``auto`` is decided per device and per use (training, or evaluation and prediction), from
measurements on this project's machines (README, Benchmarks).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def prefers_channels_last(device: torch.device, training: bool = True) -> bool:
    """Whether channels-last is the faster memory format for K-Net on ``device``.

    CUDA: yes (tensor-core convolutions). CPU with AVX-512: yes. AVX2-only CPU: for inference
    only. There oneDNN's channels-last convolution is faster forward but its backward is the
    slow path: interleaved on one 2-core AVX2 machine, the R50 step at 512x512, batch 2, spent
    7.1 s in backward channels-last against 4.7 s in NCHW (forward 2.5 s against 3.2 s), while
    inference was 16% faster channels-last (2.21 s against 2.63 s).
    """
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512") or not training
    return False


def choose_memory_format(net: nn.Module, device: torch.device, training: bool) -> bool:
    """Resolves ``channels_last=auto`` for ``net`` on ``device``: converts its parameters when
    channels-last is chosen, logs the choice, and returns it."""
    channels_last = prefers_channels_last(device, training)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    log.info("model.channels_last=auto: %s for %s on %s", "channels-last" if channels_last else "NCHW",
             "training" if training else "inference", device)  # fmt: skip
    return channels_last
