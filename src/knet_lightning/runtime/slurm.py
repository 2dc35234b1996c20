"""SLURM: Lightning's cluster environment and requeue, and the resume of a requeued job.

Everything that runs the job is someone else's: ``sbatch``/``srun`` or Hydra's submitit launcher
(``hydra/launcher=submitit_slurm``) start one process per task; Lightning's ``SLURMEnvironment``
reads the ranks and the world size from ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NODEID`` /
``SLURM_NTASKS``; Lightning's signal connector checkpoints and requeues the job. This module only
wires them together for ``trainer=slurm``:

* :func:`slurm_environment`: the ``SLURMEnvironment`` plugin, its requeue signal named in the config;
* :func:`slurm_job_id`: the ``${knet.slurm_job_id:}`` resolver, which names the run folder
  ``slurm-<job id>``. ``scontrol requeue`` keeps the job id, so the requeued job opens the same
  folder;
* :func:`auto_resume_path`: with ``auto_resume=true`` (``trainer=slurm`` sets it), a training run
  whose folder already holds a checkpoint continues from the newest one, without ``ckpt_path``.

Who owns which signal (Lightning 2.x ``trainer/connectors/signal_connector.py``, registered at the
start of every ``fit``/``test``; :mod:`knet_lightning.runtime.signals` over them in a fit):

* **SIGUSR1: the requeue.** SLURM sends it ``signal_delay_s`` before the time limit
  (``#SBATCH --signal=USR1@120``). It writes ``<run folder>/hpc_ckpt_<n>.ckpt``
  (``trainer.save_checkpoint``, so through our atomic ``SafeCheckpointIO``) and, on global rank 0,
  runs ``scontrol requeue <job id>``, as Lightning's handler would
  (``_SignalConnector._slurm_sigusr_handler_fn``), but at the end of the step in progress, on
  every rank together: :class:`~knet_lightning.runtime.signals.StepBoundarySignals` takes over Lightning's
  handler, which would checkpoint wherever the signal landed (mid-step too). Lightning installs
  its handler only if nothing else handles SIGUSR1 (``_has_already_handler``):
  :func:`check_requeue_signal` warns when something does, and then neither takes it.
* **SIGTERM: ours.** The run stops at the next step boundary (one process: Lightning's
  ``trainer.received_sigterm``; distributed: set by ``StepBoundarySignals`` on every rank after the
  same step), :class:`~knet_lightning.training.checkpointing.PreemptionCheckpoint` writes
  ``checkpoints/last.ckpt`` there and the CLI exits with 143. SLURM sends SIGTERM when it stops the
  job: after the requeue above, at the time limit, on preemption and on ``scancel``.

At the time limit the two come in that order: SIGUSR1 (hpc checkpoint, requeue), then SIGTERM as
SLURM ends the running instance (``last.ckpt`` at the next step boundary, if the step ends before
SLURM's ``KillWait``). The requeued job starts again with the same job id and
:func:`auto_resume_path` picks whichever of the two is newer.

Limits: SIGUSR1 (and SIGTERM in a distributed fit) landing during validation is acted on at its
end, so ``signal_delay_s`` should exceed a validation pass. Both checkpoints are at a step
boundary, so the requeued run resumes bit-exactly.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def slurm_job_id() -> str:
    """``$SLURM_JOB_ID``, the name of a ``trainer=slurm`` run folder (``slurm-<id>``).

    A requeued job keeps its id (an array task has its own), so this is what finds the folder
    again. Outside a SLURM job there is no such folder to find: that is an error saying so.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise ValueError(
            "trainer=slurm runs inside a SLURM job (sbatch + srun, or -m hydra/launcher=submitit_slurm): "
            "SLURM_JOB_ID is not set; on one machine use trainer=ddp or trainer=ddp_cpu"
        )
    return job_id


def slurm_environment(auto_requeue: bool = True, requeue_signal: str = "SIGUSR1") -> SLURMEnvironment:
    """Lightning's ``SLURMEnvironment`` (a Trainer plugin), the signal given by name so that the
    YAML stays readable and the number stays the platform's (SIGUSR1 is 10 on Linux, 30 on macOS).

    Raises outside a SLURM job step: Lightning would otherwise fail later, reading
    ``SLURM_NTASKS`` deep inside the strategy.
    """
    if "SLURM_NTASKS" not in os.environ:
        raise ValueError(
            "trainer=slurm needs a SLURM job step (srun, or sbatch through hydra/launcher=submitit_slurm): "
            "SLURM_NTASKS is not set; on one machine use trainer=ddp or trainer=ddp_cpu"
        )
    return SLURMEnvironment(auto_requeue=auto_requeue, requeue_signal=signal.Signals[requeue_signal])


def auto_resume_path(trainer: Any, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint a training run without ``ckpt_path`` continues from, or ``None`` (a new run).

    The candidates are this run's ``<checkpoint_dir>/last.ckpt`` (step checkpoints, the SIGTERM
    checkpoint) and Lightning's own requeue checkpoint, the newest ``hpc_ckpt_<n>.ckpt`` in the
    trainer's ``default_root_dir`` (``_CheckpointConnector._hpc_resume_path``, the file Lightning
    itself restores with ``fit(ckpt_path="hpc")``). The newer file wins; ``"hpc"`` is returned
    for Lightning's, so that Lightning resolves and restores it as it does after a requeue, also
    where its own automatic choice (``SLURMEnvironment.detect()``, false for a job named
    ``bash``/``interactive``) would not look.
    """
    candidates: dict[str, float] = {}
    last = Path(checkpoint_dir) / "last.ckpt"
    if last.is_file():
        candidates[str(last)] = last.stat().st_mtime
    hpc = trainer._checkpoint_connector._hpc_resume_path
    if hpc is not None and os.path.isfile(hpc):
        candidates["hpc"] = os.path.getmtime(hpc)
    if not candidates:
        return None
    # on a tie last.ckpt (both are written at a step boundary; a hpc file of an older version of
    # this package, or of Lightning's own handler, may be mid-step)
    choice = max(candidates, key=lambda key: (candidates[key], key != "hpc"))
    restart = os.environ.get("SLURM_RESTART_COUNT")
    log.info(
        "auto_resume: continuing from %s (the newest checkpoint of this run folder%s)",
        hpc if choice == "hpc" else choice,
        f"; SLURM restart {restart}" if restart else "",
    )
    return choice


def check_requeue_signal(trainer: Any) -> bool:
    """Whether Lightning will own the requeue signal of this trainer's ``SLURMEnvironment``.

    Lightning installs its requeue handler only when the signal has no handler yet
    (``_SignalConnector.register_signal_handlers``), silently otherwise. Something else holding it
    (submitit with ``SUBMITIT_PREEMPT_SIGNAL=USR1``, a user's handler) would leave the job without
    its hpc checkpoint and requeue; this says so in the log before training starts. ``True``
    when there is nothing to warn about (also without auto-requeue).
    """
    env = trainer._accelerator_connector.cluster_environment
    if not isinstance(env, SLURMEnvironment) or not env.auto_requeue or env.requeue_signal is None:
        return True
    handler = signal.getsignal(env.requeue_signal)
    if handler in (None, signal.SIG_DFL):
        return True
    log.warning(
        "%s already has a handler (%r): Lightning will not install its SLURM requeue handler, so the job will "
        "neither write hpc_ckpt_<n>.ckpt nor requeue itself before the time limit",
        env.requeue_signal.name,
        handler,
    )
    return False
