"""The Lightning callbacks that write and restore a run's checkpoints.

* :class:`RunCheckpoint`: ``ModelCheckpoint`` confined to its run folder; ``last.ckpt`` at every
  training epoch end too.
* :class:`RNGStateCheckpoint`: the global torch / numpy / python RNG states (dropout) go into
  the checkpoint and are put back right before the first resumed training step.
* :class:`PreemptionCheckpoint`: on SIGTERM Lightning stops at the next step boundary; this
  callback writes ``last.ckpt`` there, so the run resumes with ``ckpt_path=last``.
"""

from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["PreemptionCheckpoint", "RNGStateCheckpoint", "RunCheckpoint"]

log = logging.getLogger(__name__)


def _rng_states() -> dict[str, Any]:
    # plain types only (lists, ints, tensors), so the checkpoint loads with weights_only=True
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    npst = states["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that tracks the best checkpoint of its own run folder only, and can
    rewrite ``last.ckpt`` at every training epoch end.

    A run resumed into a new folder (``ckpt_path=`` of another run) gets a checkpoint whose
    callback state names files of the old folder. Lightning then warns "The dirpath has
    changed" once per checkpoint callback and still restores ``best_model_path``, which points
    into the old folder (and a later, better checkpoint would delete that file). Here the old
    state is left with the old run: tracking starts anew in this folder, said in one line (in a
    fit only: ``mode=eval`` restores the callbacks too, but writes no checkpoint).

    Args:
        save_last_on_train_epoch_end: also write ``last.ckpt`` at the end of every training
            epoch. Lightning's own epoch-end save of ``last`` follows a top-k save only, and a
            monitored checkpoint saves when validation runs (every ``check_val_every_n_epoch``
            epochs), so without it a crash between two validations and two step checkpoints
            would lose every epoch since. The write runs after the epoch's validation (a
            monitoring callback's epoch-end hook comes last), so the file holds its result.
    """

    def __init__(self, *args: Any, save_last_on_train_epoch_end: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_last_on_train_epoch_end = bool(save_last_on_train_epoch_end)
        self._fitting = False
        self._found_files = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning warns here of a non-empty checkpoint folder, which is what a run resumed in
        # its own folder (the README's resume command) finds; which checkpoint the fit resumes
        # from is known only after setup, so the warning waits for on_train_start
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        folder = Path(self.dirpath) if self.dirpath else None
        self._found_files = stage == "fit" and folder is not None and folder.is_dir() and any(folder.iterdir())
        # setup runs before a checkpoint's callback states are restored (load_state_dict)
        self._fitting = stage == "fit"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # resumed from a checkpoint of this run folder (checkpoints/last.ckpt, SLURM's hpc_ckpt_<n>.ckpt)
        run_folder = Path(self.dirpath).resolve().parent if self.dirpath else None
        resumed_here = (
            trainer.ckpt_path is not None
            and run_folder is not None
            and Path(trainer.ckpt_path).resolve().is_relative_to(run_folder)
        )
        if self.save_top_k != 0 and self._found_files and not resumed_here:
            # a new fit among another run's checkpoints may overwrite them: Lightning's warning
            rank_zero_warn(f"Checkpoint directory {self.dirpath} exists and is not empty.")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # skipped when this callback already saved at this step (a step checkpoint on the
        # epoch's last step), in fast_dev_run, and outside fit; every rank calls it (DDP: the
        # save is collective, rank 0 writes, atomically through SafeCheckpointIO)
        if self.save_last_on_train_epoch_end and self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        before = state_dict.get("dirpath", self.dirpath)
        if before == self.dirpath:
            super().load_state_dict(state_dict)
            return
        if self.save_top_k != 0 and self.monitor and self._fitting:
            log.info(
                "resumed into a new folder: the best checkpoint by %s is tracked anew in %s (the earlier run's "
                "stays in %s)",
                self.monitor,
                self.dirpath,
                before,
            )


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states (torch, numpy, python, CUDA) in every checkpoint and puts them
    back right before the first training step of a resumed run.

    Restoring at ``on_train_batch_start`` rather than at load time matters: between loading and
    the first step Lightning builds loaders and prefetches, and the states must be those of the
    moment the checkpoint was written, which was also between two steps.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class PreemptionCheckpoint(Callback):
    """On SIGTERM (preemption, ``scancel``, a SLURM time limit) the run stops at the next step
    boundary and this callback writes ``<dirpath>/last.ckpt`` there, so ``ckpt_path=last`` (or
    ``auto_resume``) continues from that step, and the CLI exits with 143.

    SIGTERM is ours, SIGUSR1 the requeue's: under ``trainer=slurm`` it writes ``hpc_ckpt_<n>.ckpt``
    in the run folder and requeues the job, and the SIGTERM with which SLURM then ends the
    instance comes here (:mod:`knet_lightning.runtime.slurm` has the whole sequence). One process stops
    on Lightning's own ``trainer.received_sigterm``; in a distributed fit
    :class:`~knet_lightning.runtime.signals.StepBoundarySignals` sets it on every rank after the same
    step, so that the collective save below meets every rank there.

    Args:
        dirpath: checkpoint folder (the run's ``checkpoints/``).
        filename: file name of the checkpoint.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.saved_path: Path | None = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or not trainer.training and not trainer.validating:
            return
        if trainer.state.fn != "fit":
            return
        path = self.dirpath / self.filename
        trainer.save_checkpoint(path, weights_only=False)  # the full training state, for the resume
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM: saved %s at step %d (epoch %d); resume with ckpt_path=%s (or ckpt_path=last "
                "hydra.run.dir=%s)",
                path,
                trainer.global_step,
                trainer.current_epoch,
                path,
                trainer.default_root_dir,
            )
