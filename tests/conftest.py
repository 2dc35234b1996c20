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


# The longest files first: `make test` runs `--dist loadfile`, and pytest-xdist hands the files to
# its two workers in collection order, so a long file collected last (test_readme.py: ~4 min) left
# one worker idle at the end. Stable: tests keep their order within a file.
_LONGEST_FILES = ("test_readme.py", "test_serve.py", "test_slurm_cluster.py", "test_slurm.py", "test_experiments.py",
                  "test_segmenter.py", "test_own_data.py", "test_ddp.py", "test_sweep.py", "test_overfit.py",
                  "test_reference_pipeline.py", "test_wheel.py", "test_convert_mmseg.py", "test_gpu_check.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
