"""Training order and per-sample randomness that a resumed run reproduces exactly.

:class:`ResumableSampler` + :class:`SeededSamples`: the training order is a function of
``(seed, epoch)`` and every sample's augmentation randomness a function of
``(seed, epoch, index)``, so the position in the epoch (saved in the checkpoint) is all a
resumed run needs to draw exactly the batches the interrupted run would have drawn.
:class:`SeededSamples` also applies the ``on_bad_sample`` policy.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from knet_lightning.data.meta import DatasetError

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "ResumableDataLoader",
    "ResumableSampler",
    "SeededSamples",
    "sample_seed",
]

log = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")


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
                # only the CPU generator that the transforms draw from: torch.manual_seed also
                # seeds CUDA, which, uninitialised in a loader worker, records a Python stack
                # trace per call (a quarter of a synthetic sample's loading time)
                torch.default_generator.manual_seed(seed)
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
        # batches of this size that the consumed positions of the epoch account for
        self.consumed_batches = 0
        self._iter_epoch = 0
        self._skip: Optional[tuple[int, int]] = None  # (epoch, global positions to skip)
        # the epoch's positions skipped at its start and the batches they account for
        self._start = (0, 0)

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
        rest = order[skip:]
        self.consumed_batches = self.batches_done_after(skip)
        self._start = (skip, self.consumed_batches)
        if rest and len(rest) % self.num_replicas:  # equal shards, as DistributedSampler pads
            pad = self.num_replicas - len(rest) % self.num_replicas
            rest += (order * (pad // n + 1))[:pad]
        epoch = self.epoch
        for index in rest[self.rank :: self.num_replicas]:
            yield epoch, index

    def batches_per_epoch(self) -> int:
        """Batches of one epoch on each process (``len`` of the loader)."""
        return math.ceil(self.num_samples / self.batch_size)

    def batches_done_after(self, consumed: int) -> int:
        """The batches of this size that ``consumed`` positions of an epoch account for.

        By sample count: all the epoch's batches but those the remaining positions fill, so
        that the training loop's batch count ends the epoch with the data even when the
        positions were consumed with another batch size or number of processes.
        """
        remaining = max(0, len(self.dataset) - consumed)  # type: ignore[arg-type]
        return self.batches_per_epoch() - math.ceil(math.ceil(remaining / self.num_replicas) / self.batch_size)

    def resumed_position(self) -> Optional[tuple[int, int]]:
        """``(epoch, consumed positions)`` that the next iteration resumes from, if any."""
        return self._skip

    def mark_consumed(self) -> None:
        self.consumed_batches += 1

    def consumed_samples(self) -> int:
        """Positions of the epoch consumed so far, over all processes."""
        skipped, start_batches = self._start
        taken = (self.consumed_batches - start_batches) * self.batch_size * self.num_replicas
        return min(len(self.dataset), skipped + taken)  # type: ignore[arg-type]

    def state_dict(self, epoch_done: bool = False) -> dict[str, Any]:
        return {
            "epoch": self._iter_epoch,
            "consumed": self.consumed_samples(),
            "epoch_done": bool(epoch_done),
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "seed": self.seed,
            "shuffle": self.shuffle,
            "samples_per_step": self.batch_size * self.num_replicas,
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
        consumed = int(state["consumed"])
        self._skip = (epoch, consumed)
        self._iter_epoch = epoch
        # a checkpoint written before the resumed iteration starts records the same position
        self.consumed_batches = self.batches_done_after(consumed)
        self._start = (consumed, self.consumed_batches)


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
