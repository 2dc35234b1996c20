"""Shared test set-up: small, deterministic, CPU-only."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# CI has 2 cores; several test processes may share them.
torch.set_num_threads(int(os.environ.get("KNET_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_report_header(config: pytest.Config) -> str:
    """Free disk under the temporary root: a full disk fails tests far from its cause."""
    import shutil
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return f"knet-lightning: {free:.1f} GiB free under {tempfile.gettempdir()}; CPU {torch.backends.cpu.get_cpu_capability()}"
