"""``scripts/gpu_check.sh --device cpu --tiny``: the GPU check's every step, tiny, on the CPU.

On a lent GPU the same script runs at full size (its docstring); here it shows that each step
runs and reports what it must: the bench sections, a training whose loss falls, a DDP run
resumed exactly, and the device paths equal to the CPU's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(900)


def documented_command() -> str:
    """The Benchmarks page's CPU command of the check."""
    from docs_blocks import blocks, commands, section

    page = section("docs/benchmarks.md", "### The prepared GPU check")
    (command,) = [c for block in blocks(page) for c in commands(block, "scripts/gpu_check.sh") if "--tiny" in c]
    return command


def test_the_gpu_check_runs_every_step_tiny_on_the_cpu(tmp_path: Path) -> None:
    """The page's command as written, from a checkout's root (``scripts/`` linked in), with this
    environment's Python (``$PYTHON``, which the script prefers to the checkout's .venv)."""
    import os
    import shlex
    import sys

    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    proc = subprocess.run(shlex.split(documented_command()), cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    out = tmp_path / "gpu_check_cpu.json"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    steps = record["steps"]
    assert list(steps) == ["bench", "train", "ddp_resume", "device_paths"]
    assert all(step["ok"] and step["seconds"] > 0 for step in steps.values())
    assert record["machine"]["device"] == "cpu" and record["tiny"] is True

    bench = steps["bench"]
    assert bench["amp"] == "bf16" and set(bench["sections"]) == {"knet", "mask2former", "zoo"}
    knet_rows = bench["sections"]["knet"]["rows"]
    assert {(r["batch"], r["mode"]) for r in knet_rows} >= {(2, "inference"), (2, "train")}
    assert all(r["images_per_s"] > 0 and r["peak_mb"] > 0 for r in knet_rows)
    m2f = bench["sections"]["mask2former"]
    assert m2f["status"] == "ok" or "transformers" in m2f["reason"]  # the bench extra is not in the test env
    assert bench["sections"]["zoo"]["status"] == "ok"

    train = steps["train"]
    assert train["steps"] == 40 and train["falling"], train["losses"]

    ddp = steps["ddp_resume"]
    assert ddp["steps"] == [50, 50] and ddp["backend"] == "gloo"
    assert ddp["exact"] and ddp["max_weight_diff"] == 0.0 and ddp["loss_whole"] == ddp["loss_resumed"]

    paths = steps["device_paths"]
    assert paths["sparse_merge"] == {"owner_equal": True, "areas_equal": True} and paths["fused_adamw_close"]
    assert paths["dense_merge"] == {"folds_equal": True, "owner_agreement_with_cpu": 1.0}
    assert "gpu_check:" in proc.stdout
