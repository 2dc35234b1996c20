"""Fault tolerance: exact resume, preemption, atomic and safe checkpoints, bad samples.

What each piece guarantees (the README's "Fault tolerance" section says it for users):

* :class:`SafeCheckpointIO` (a Lightning ``CheckpointIO`` plugin) writes every checkpoint to a
  temporary file in the same folder, fsyncs it and renames it over the target, so a kill during
  the write leaves the previous ``last.ckpt`` intact; it loads with ``weights_only=True`` unless
  the user marks the file trusted, and names the file when it is truncated or corrupt.
* :class:`ResumableSampler` + :class:`SeededSamples`: the training order is a function of
  ``(seed, epoch)`` and every sample's augmentation randomness a function of
  ``(seed, epoch, index)``, so the position in the epoch (saved in the checkpoint) is all a
  resumed run needs to draw exactly the batches the interrupted run would have drawn.
* :class:`RNGStateCheckpoint`: the global torch / numpy / python RNG states (dropout) go into
  the checkpoint and are put back right before the first resumed training step.
* :class:`PreemptionCheckpoint`: on SIGTERM Lightning stops at the next step boundary; this
  callback writes ``last.ckpt`` there, so the run resumes with ``ckpt_path=last``.
* :class:`BadSampleReport`: with ``on_bad_sample=skip`` it counts and reports the skipped files.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from knet_lightning.data.meta import DatasetError

log = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or holds objects that are not safe to load."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a NaN or infinite loss."""


# --------------------------------------------------------------------------- checkpoints


def _fsync_dir(folder: Path) -> None:
    # the rename is only durable once the folder entry is on disk (POSIX); best effort elsewhere
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``: temporary file in the same
    folder (same file system, so the rename is atomic), flushed and fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    # temporary files of writers that were killed mid-write (other pids) are garbage now
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", trusted: bool = False) -> Any:
    """Loads a checkpoint or weight file, with ``weights_only=True`` unless ``trusted``.

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, or (untrusted) holds
            objects that ``weights_only`` loading refuses; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write that made it did not finish")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if not trusted and "weights only load failed" in str(err).lower():
            raise CheckpointError(
                f"checkpoint {path} holds objects that safe loading (torch.load weights_only=True) refuses: "
                f"{str(err).splitlines()[0]} ... If you trust this file, load it with trusted_checkpoint=true."
            ) from err
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is corrupt: {err}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        # torch's zip reader says "failed finding central directory" for a cut-off file
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) is truncated or corrupt and cannot be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); use an earlier "
            "checkpoint of the run (checkpoints/*.ckpt)"
        ) from err


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic local writes and safe, well-reported loading.

    Args:
        trusted: load with ``weights_only=False`` (only for files you trust: unpickling can run
            code). ``trusted_checkpoint`` in the config.
    """

    def __init__(self, trusted: bool = False) -> None:
        super().__init__()
        self.trusted = bool(trusted)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if not _is_local(path):  # object stores: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Optional[bool] = None) -> Any:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        trusted = self.trusted if weights_only is None else not weights_only
        if map_location is None:
            map_location = lambda storage, loc: storage  # noqa: E731 - Lightning's own default
        return load_checkpoint_file(str(path).removeprefix("file://"), map_location=map_location, trusted=trusted)


# --------------------------------------------------------------------------- data order and randomness


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed that depends only on (seed, epoch, index): a resumed run re-draws the same
    augmentation for a sample whichever process or worker loads it."""
    mixed = (int(seed) * 1_000_003 + int(epoch)) * 1_000_003 + int(index)
    return mixed % (2**63 - 1)


class SeededSamples(Dataset):
    """Training-set wrapper: per-sample RNG seeding and the ``on_bad_sample`` policy.

    Keys are ``(epoch, index)`` pairs from :class:`ResumableSampler` (a plain index means epoch 0).
    The sample is loaded under a forked RNG seeded by :func:`sample_seed`, so the transforms'
    draws neither depend on nor disturb the process's global RNG state.

    With ``on_bad_sample="skip"`` a sample whose files are bad (the reader raises
    :class:`DatasetError`) is logged and replaced by the next index, so batches keep their size
    (DDP ranks stay in step); the replacement carries ``target["skipped"]``, a list of
    ``"<reason naming the file>"`` strings that :class:`BadSampleReport` counts.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, on_bad_sample: str = "error") -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"data.on_bad_sample: expected one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        self.dataset = dataset
        self.seed = int(seed)
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # class_info, image_info, max_things_per_image ... of the wrapped reader
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _load(self, epoch: int, index: int) -> Any:
        state_py, state_np = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                seed = sample_seed(self.seed, epoch, index)
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(state_py)
            np.random.set_state(state_np)

    def __getitem__(self, key: Any) -> Any:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))
        n = len(self)
        skipped: list[str] = []
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image, target = self._load(epoch, i)
            except DatasetError as err:
                if self.on_bad_sample == "error":
                    raise
                log.warning("on_bad_sample=skip: skipping training sample %d: %s", i, err)
                skipped.append(str(err))
                continue
            if skipped:
                target["skipped"] = skipped
            return image, target
        raise DatasetError(
            f"on_bad_sample=skip: none of the {n} training samples could be loaded; first error: {skipped[0]}"
        )


class ResumableSampler(DistributedSampler):
    """The training order, resumable mid-epoch, for one or several processes.

    The epoch's order is a permutation seeded by ``seed + epoch`` (as ``DistributedSampler``,
    which this is, so Lightning does not wrap it under DDP); rank ``r`` of ``R`` takes positions
    ``r, r + R, ...``. After ``k`` batches of ``b`` on every rank the first ``k * b * R``
    positions are consumed, so resuming skips them and shards the rest (also onto a different
    number of processes). Items are ``(epoch, index)`` pairs for :class:`SeededSamples`.

    ``consumed_batches`` is advanced by the data module when the training loop takes a batch
    (not when a loader prefetches one), so a checkpoint records exactly what was trained on.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = int(batch_size)
        self.consumed_batches = 0
        self._iter_epoch = 0
        self._skip: Optional[tuple[int, int]] = None  # (epoch, global positions to skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        skip = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            skip = min(self._skip[1], len(order))
        self._skip = None
        self._iter_epoch = self.epoch
        self.consumed_batches = skip // (self.batch_size * self.num_replicas)
        rest = order[skip:]
        if rest and len(rest) % self.num_replicas:  # equal shards, as DistributedSampler pads
            pad = self.num_replicas - len(rest) % self.num_replicas
            rest += (order * (pad // n + 1))[:pad]
        epoch = self.epoch
        for index in rest[self.rank :: self.num_replicas]:
            yield epoch, index

    def mark_consumed(self) -> None:
        self.consumed_batches += 1

    def state_dict(self, epoch_done: bool = False) -> dict[str, Any]:
        return {
            "epoch": self._iter_epoch,
            "consumed": self.consumed_batches * self.batch_size * self.num_replicas,
            "epoch_done": bool(epoch_done),
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        size = len(self.dataset)  # type: ignore[arg-type]
        epoch = int(state["epoch"])
        if state.get("epoch_done"):
            self.set_epoch(epoch + 1)
            self._skip = None
            return
        self.set_epoch(epoch)
        changed = [
            f"{key} {state.get(key)} -> {now}"
            for key, now in (("dataset_size", size), ("seed", self.seed), ("shuffle", self.shuffle))
            if state.get(key) != now
        ]
        if changed:
            log.warning(
                "resuming mid-epoch %d, but the training order changed since the checkpoint (%s): this epoch "
                "restarts from its first batch, so the resumed run is not identical to an uninterrupted one",
                epoch, ", ".join(changed),
            )
            self._skip = None
            return
        self._skip = (epoch, int(state["consumed"]))
        self._iter_epoch = epoch
        self.consumed_batches = int(state["consumed"]) // (self.batch_size * self.num_replicas)


class ResumableDataLoader(DataLoader):
    """A training loader whose position Lightning saves and restores (its ``state_dict``
    protocol): the state is the :class:`ResumableSampler`'s."""

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        return sampler.state_dict() if isinstance(sampler, ResumableSampler) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if state and isinstance(sampler, ResumableSampler):
            sampler.load_state_dict(state)


# --------------------------------------------------------------------------- callbacks


def _rng_states() -> dict[str, Any]:
    # plain types only (lists, ints, tensors), so the checkpoint loads with weights_only=True
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
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


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states (torch, numpy, python, CUDA) in every checkpoint and puts them
    back right before the first training step of a resumed run.

    Restoring at ``on_train_batch_start`` rather than at load time matters: between loading and
    the first step Lightning builds loaders and prefetches, and the states must be those of the
    moment the checkpoint was written, which was also between two steps.
    """

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None


class PreemptionCheckpoint(Callback):
    """On SIGTERM (preemption, ``scancel``, a SLURM time limit) Lightning finishes the current
    step and raises ``SIGTERMException``; this callback then writes ``<dirpath>/last.ckpt``, so
    ``ckpt_path=last`` continues from that step. (Under SLURM with requeue, Lightning's own
    SIGUSR1 handler writes ``hpc_ckpt_<n>.ckpt`` in the run folder and requeues the job.)

    Args:
        dirpath: checkpoint folder (the run's ``checkpoints/``).
        filename: file name of the checkpoint.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.saved_path: Optional[Path] = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or not trainer.training and not trainer.validating:
            return
        if trainer.state.fn != "fit":
            return
        path = self.dirpath / self.filename
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning(
                "SIGTERM: saved %s at step %d (epoch %d); resume with ckpt_path=%s (or ckpt_path=last "
                "hydra.run.dir=%s)",
                path, trainer.global_step, trainer.current_epoch, path, trainer.default_root_dir,
            )


class BadSampleReport(Callback):
    """Counts the training samples skipped under ``data.on_bad_sample=skip`` (the replacements
    carry ``target["skipped"]``), logs ``train/skipped_samples`` and lists them at epoch end."""

    def __init__(self, max_listed: int = 20) -> None:
        self.max_listed = int(max_listed)
        self.epoch_skipped: list[str] = []
        self.total = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch_skipped = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict):
            for target in batch.get("targets", []):
                self.epoch_skipped.extend(target.pop("skipped", []) if isinstance(target, dict) else [])

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        local = torch.tensor(float(len(self.epoch_skipped)), device=pl_module.device)
        count = int(trainer.strategy.reduce(local, reduce_op="sum").item())
        self.total += count
        pl_module.log("train/skipped_samples", float(count), on_epoch=True, on_step=False, batch_size=1)
        if self.epoch_skipped:
            listed = "\n  ".join(self.epoch_skipped[: self.max_listed])
            more = len(self.epoch_skipped) - self.max_listed
            log.warning(
                "epoch %d: skipped %d bad training sample(s) (data.on_bad_sample=skip):\n  %s%s",
                trainer.current_epoch, count, listed, f"\n  ... and {more} more" if more > 0 else "",
            )
