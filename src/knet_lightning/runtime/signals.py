"""SIGTERM and SLURM's requeue signal: acted on at a step boundary, by every rank of a
distributed fit together.

Lightning 2.6 acts on both inside the signal handler (``trainer/connectors/signal_connector.py``):
on SIGTERM ``_sigterm_notifier_fn`` calls ``torch.distributed.broadcast``, and on the requeue
signal ``_slurm_sigusr_handler_fn`` calls ``trainer.save_checkpoint``, whose barrier is a
collective too. A handler runs wherever the signal lands, between two Python bytecodes, so under
DDP one rank can enter that collective while another is in a gradient all-reduce: the job hangs
until SLURM's SIGKILL (simulated 2-task jobs did). Its loops also read each rank's own
``received_sigterm``, so ranks signalled a moment apart can stop at different steps. Even in one
process, a checkpoint written inside the handler is one of whatever state the step had reached
(half an optimizer update, say), so the requeued run does not resume exactly.

:class:`StepBoundarySignals` replaces those handlers when a fit starts (Lightning restores the
original handlers at its teardown): the requeue handler always, SIGTERM's in a distributed fit
(in one process Lightning's only sets a flag its loops read between steps). Its handlers only
note the signal (and pass SIGTERM on to the ranks Lightning's launcher started, as Lightning's
does). At the end of every training step, and at the end of a validation run inside the fit, the
ranks all-reduce (max) what they noted, so they all decide alike, whichever of them were
signalled:

* the requeue signal: every rank takes part in ``hpc_ckpt_<n>.ckpt`` (written at the step
  boundary, so the requeued job resumes bit-exactly), then global rank 0 runs
  ``scontrol requeue <job id>``, as Lightning's handler does;
* SIGTERM: ``trainer.received_sigterm`` is set on every rank; Lightning's loops stop after this
  step and :class:`~knet_lightning.training.checkpointing.PreemptionCheckpoint` writes ``last.ckpt``.

In one process Lightning's SIGTERM flag stops the run right after the step's batch-end hooks;
a requeue signal noted in that step is then acted on as the run stops (``on_exception``), so
that a SIGTERM close behind it does not lose the requeue.

A signal that lands during validation waits for the end of it, so ``signal_delay_s`` (SLURM's
``--signal=USR1@<s>``) should exceed a validation pass.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import threading
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def requeue_job_id() -> str:
    """The id ``scontrol requeue`` takes for this job: ``<array job id>_<task id>`` for a task of
    a job array (a sweep through the submitit launcher), else ``$SLURM_JOB_ID``."""
    array_job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job_id:
        return f"{array_job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class StepBoundarySignals(Callback):
    """Acts on SIGTERM and the SLURM requeue signal at a step boundary, on every rank of a
    distributed fit together (see the module docstring)."""

    def __init__(self) -> None:
        self.noted: dict[str, bool] = {"requeue": False, "sigterm": False}
        self._active = False
        self._distributed = False

    @property
    def sigterm_noted(self) -> bool:
        """Whether this rank has received SIGTERM that the ranks have not acted on yet."""
        return self.noted["sigterm"]

    @property
    def requeue_noted(self) -> bool:
        """Whether this rank has received the requeue signal that the ranks have not acted on yet."""
        return self.noted["requeue"]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.noted = {"requeue": False, "sigterm": False}
        # signal handlers can only be set from the main thread
        self._active = threading.current_thread() is threading.main_thread()
        if not self._active:
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._distributed = trainer.world_size > 1 and distributed
        if self._distributed:
            signal.signal(signal.SIGTERM, functools.partial(self._note_sigterm, trainer))
        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            # only where Lightning installed its requeue handler (knet_lightning.runtime.slurm.check_requeue_signal
            # has warned otherwise): a handler of someone else's stays
            if isinstance(signal.getsignal(env.requeue_signal), _HandlersCompose):
                signal.signal(env.requeue_signal, self._note_requeue)

    def _note_sigterm(self, trainer: Trainer, signum: int, frame: Any) -> None:
        log.info("rank %d: SIGTERM, stopping after this step", trainer.global_rank)
        launcher = trainer.strategy.launcher
        if not self.noted["sigterm"] and launcher is not None:
            launcher.kill(signum)  # the ranks this process started
        self.noted["sigterm"] = True

    def _note_requeue(self, signum: int, frame: Any) -> None:
        log.info("%s: checkpoint and requeue after this step", signal.Signals(signum).name)
        self.noted["requeue"] = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._act(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._act(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # In one process Lightning's SIGTERM flag stops the run right after this step's batch-end
        # hooks: a requeue signal noted since the last boundary is acted on here, so that the
        # SIGTERM with which SLURM ends the job does not lose the requeue. (In a distributed fit
        # _act has handled both at the same boundary.)
        if self._active and not self._distributed and self.noted["requeue"] and isinstance(exception, SIGTERMException):
            self.noted["requeue"] = False
            self._checkpoint_and_requeue(trainer)

    def _act(self, trainer: Trainer) -> None:
        if not self._active:
            return
        requeue, sigterm = self.noted["requeue"], self.noted["sigterm"]
        if self._distributed:
            flags = torch.tensor([float(requeue), float(sigterm)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            requeue, sigterm = (bool(v) for v in flags.tolist())
        if requeue:
            self.noted["requeue"] = False
            self._checkpoint_and_requeue(trainer)
        if sigterm:
            # the flag Lightning's loops read (Trainer.received_sigterm is its signal connector's)
            trainer._signal_connector.received_sigterm = True

    def _checkpoint_and_requeue(self, trainer: Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()
        # Lightning's own name and folder for it, which it (and auto_resume) restore from
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        if not trainer.is_global_zero:
            return
        job_id = requeue_job_id()
        try:
            code = subprocess.call(["scontrol", "requeue", job_id])
        except FileNotFoundError:  # the checkpoint is there; the job just ends at its time limit
            log.warning("saved %s at step %d; no `scontrol` on PATH to requeue SLURM job %s", path,
                        trainer.global_step, job_id)  # fmt: skip
            return
        if code == 0:
            log.info("saved %s at step %d; requeued SLURM job %s", path, trainer.global_step, job_id)
        else:
            log.warning("saved %s at step %d; `scontrol requeue %s` failed with exit code %d",
                        path, trainer.global_step, job_id, code)  # fmt: skip
