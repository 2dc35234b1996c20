"""Callbacks that the CLI loads in the tests of requeue and resume (``tests/`` on PYTHONPATH, as
for ``distributed_utils.Probe``), and a stand-in for SLURM's ``scontrol``."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class PauseAtStep(Callback):
    """After each optimizer step of ``at_steps`` that this run has not trained yet
    (``on_train_batch_end``, where step checkpoints are written too), every rank writes
    ``<flag_dir>/paused<step>.rank<r>`` and waits (up to ``timeout`` s) for a SIGTERM, or with
    ``release="any"`` for SLURM's requeue signal too, so that the test's signals land between two
    steps. The same command pauses a run at 2 and the run resumed from step 2 at 3."""

    def __init__(self, at_steps: list[int], flag_dir: str, timeout: float = 120.0, release: str = "sigterm") -> None:
        if release not in ("sigterm", "any"):
            raise ValueError(f"release: 'sigterm' or 'any', not {release!r}")
        self.at_steps = sorted(int(s) for s in at_steps)
        self.flag_dir = Path(flag_dir)
        self.timeout = float(timeout)
        self.release = release
        self._ahead: list[int] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ahead = [s for s in self.at_steps if s > trainer.global_step]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step not in self._ahead:
            return
        self._ahead.remove(trainer.global_step)
        self.flag_dir.mkdir(parents=True, exist_ok=True)
        (self.flag_dir / f"paused{trainer.global_step}.rank{trainer.global_rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        # a signal handler does not cut a sleep short: poll. StepBoundarySignals notes a DDP run's
        # SIGTERM (and sets received_sigterm at the step's end) and the requeue signal
        while not self._released(trainer) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _released(self, trainer: Trainer) -> bool:
        from knet_lightning.runtime.signals import StepBoundarySignals

        if trainer.received_sigterm:
            return True
        for cb in trainer.callbacks:
            if isinstance(cb, StepBoundarySignals) and (cb.sigterm_noted or self.release == "any" and cb.requeue_noted):
                return True
        return False


class MarkStep(Callback):
    """After optimizer step ``at_step``, every rank writes ``<flag_dir>/at<step>.rank<r>`` and
    trains on: a test's signals then land wherever the ranks are, mid-step included."""

    def __init__(self, at_step: int, flag_dir: str) -> None:
        self.at_step = int(at_step)
        self.flag_dir = Path(flag_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.at_step:
            self.flag_dir.mkdir(parents=True, exist_ok=True)
            (self.flag_dir / f"at{trainer.global_step}.rank{trainer.global_rank}").write_text(str(os.getpid()))


class KillAtStep(Callback):
    """After optimizer step ``at_step``, global rank 0 SIGKILLs its whole process group (the CLI
    and the DDP ranks it started: a node lost, a job killed without warning)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = int(at_step)
        self._armed = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._armed = trainer.global_step < self.at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self._armed and trainer.global_step == self.at_step and trainer.is_global_zero:
            os.killpg(os.getpgrp(), signal.SIGKILL)


class StartStep(Callback):
    """Appends the step each rank's training starts at (after any restore) to
    ``<out_dir>/start.rank<r>.txt``, one line per run."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / f"start.rank{trainer.global_rank}.txt").open("a") as fh:
            fh.write(f"{trainer.global_step}\n")


def start_steps(out_dir: Path, rank: int = 0) -> list[int]:
    """The start steps :class:`StartStep` wrote for ``rank``, one per run."""
    return [int(line) for line in (out_dir / f"start.rank{rank}.txt").read_text().split()]


def fake_scontrol(bin_dir: Path, record: Path) -> Path:
    """An ``scontrol`` that appends its arguments to ``record`` and succeeds, first on PATH
    where ``bin_dir`` is: Lightning's requeue handler runs ``scontrol requeue <job id>``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def slurm_env(job_id: str, ntasks: int = 1, procid: int = 0, nnodes: int = 1, **extra: str) -> dict[str, str]:
    """The variables srun gives one task of a job with ``ntasks`` tasks on ``nnodes`` nodes
    (tasks spread evenly, node by node)."""
    per_node = ntasks // nnodes
    env = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "knet-train",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_NNODES": str(nnodes),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % per_node),
        "SLURM_NODEID": str(procid // per_node),
        "SLURM_JOB_NODELIST": "127.0.0.1",
        "SLURM_NODELIST": "127.0.0.1",
    }
    env.update(extra)
    return env
