"""Running the real CLI in subprocesses (DDP re-launches the script, so these tests cannot run
in-process), and a probe callback that the CLI loads with
``+callbacks.probe._target_=distributed_utils.Probe`` (``tests/`` on PYTHONPATH): every rank
writes what it saw to ``<out_dir>/probe.rank<r>.json``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from cli_utils import TINY_DATA, TINY_MODEL
from lightning.pytorch import Callback, LightningModule, Trainer


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Probe(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"val_images": [], "test_images": []}

    def _save(self, trainer: Trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.record.update(
            world_size=trainer.world_size,
            global_rank=trainer.global_rank,
            num_nodes=trainer.num_nodes,
            global_step=trainer.global_step,
        )
        (self.out_dir / f"probe.rank{trainer.global_rank}.json").write_text(json.dumps(self.record, indent=1))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["val_images"] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.record["val_images"] += [str(t["file_name"]) for t in batch["targets"]]

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.record["test_images"] += [str(t["file_name"]) for t in batch["targets"]]

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["final_weights"] = weights_digest(pl_module)
        self._save(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)


# ---------------------------------------------------------------------- running the real CLI
TESTS_DIR = Path(__file__).resolve().parent

# the tiny settings of cli_utils, for the command line: 5 validation images (odd: a padding
# DistributedSampler would repeat one), one image per evaluation batch, two training steps,
# no progress bars, and post-processing thresholds at 0 so that an untrained model still
# predicts segments and the metrics are not all zero
CLI_TINY = [
    o for o in TINY_MODEL + TINY_DATA if not o.startswith(("data.num_val=", "data.val_batch_size=", "data.batch_size="))
] + [
    "data.num_val=5",
    "data.val_batch_size=1",
    "data.batch_size=2",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "model.postprocess.object_mask_thr=0.0",
    "model.postprocess.overlap_thr=0.0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: outputs and data under ``root``, ``tests/`` importable
    (for the probe callback), no DDP variables inherited from the test process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")
    }
    env.update(
        KNET_ROOT=str(root),
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HYDRA_FULL_ERROR="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def probe_overrides(out_dir: Path) -> list[str]:
    return ["+callbacks.probe._target_=distributed_utils.Probe", f"+callbacks.probe.out_dir={out_dir}"]


def start_cli(
    args: list[str], root: Path, env: dict[str, str] | None = None, prefix: list[str] | None = None
) -> subprocess.Popen:
    """Starts ``python -m knet_lightning ARGS`` (or ``PREFIX ARGS``) in ``root``; its output goes
    to ``root/cli-<n>.log`` (a file, not a pipe: a full pipe would block a chatty run)."""
    root.mkdir(parents=True, exist_ok=True)
    command = (prefix or [sys.executable, "-m", "knet_lightning"]) + list(args)
    log_path = root / f"cli-{len(list(root.glob('cli-*.log')))}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command, cwd=root, env=env or cli_env(root), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def wait_cli(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Waits for a CLI process; fails the test with the end of its output if it failed."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # the whole session: the CLI and the DDP ranks it started
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = proc.log_path.read_text()  # type: ignore[attr-defined]
    assert proc.returncode == 0, f"{proc.args} exited with {proc.returncode}:\n{out[-6000:]}"
    return out


def run_cli(args: list[str], root: Path, timeout: float = 300, **env_extra: str) -> str:
    return wait_cli(start_cli(args, root, cli_env(root, **env_extra)), timeout)


def read_probes(out_dir: Path) -> dict[int, dict[str, Any]]:
    return {
        int(p.name.split("rank")[1].split(".")[0]): json.loads(p.read_text())
        for p in sorted(out_dir.glob("probe.rank*.json"))
    }
