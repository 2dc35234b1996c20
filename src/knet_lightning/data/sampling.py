"""Training order and per-sample randomness that a resumed run reproduces exactly.

:class:`ResumableSampler` + :class:`SeededSamples`: the training order is a function of
``(seed, epoch)`` and every sample's augmentation randomness a function of
``(seed, epoch, index)``, so the position in the epoch (saved in the checkpoint) is all a
resumed run needs to draw exactly the batches the interrupted run would have drawn.
:class:`SeededSamples` also applies the ``on_bad_sample`` policy.
:class:`GroupedResumableSampler` is the same order with each training step's images of one
orientation (``data.group_by_aspect_ratio``), so batches are padded less.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from knet_lightning.data.meta import DatasetError

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "GroupedResumableSampler",
    "ResumableDataLoader",
    "ResumableSampler",
    "SeededSamples",
    "aspect_ratio_flags",
    "continue_by_sample_count",
    "grouped_order",
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

    # what the epoch's order is a function of besides (seed, epoch, dataset size, shuffle); a
    # checkpoint of another kind of order cannot be resumed mid-epoch (one without the key is plain)
    order_kind = "plain"

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
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
        self._skip: tuple[int, int] | None = None  # (epoch, global positions to skip)
        # the epoch's positions skipped at its start and the batches they account for
        self._start = (0, 0)

    def _epoch_order(self, n: int) -> list[int]:
        """The epoch's order of the ``n`` indices, a function of ``(seed, epoch)`` only."""
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        n = len(self.dataset)  # type: ignore[arg-type]
        order = self._epoch_order(n)
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

    def resumed_position(self) -> tuple[int, int] | None:
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
            "order": self.order_kind,
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
        saved = {**state, "order": state.get("order", "plain")}
        changed = [
            f"{key} {saved.get(key)} -> {now}"
            for key, now in (
                ("dataset_size", size),
                ("seed", self.seed),
                ("shuffle", self.shuffle),
                ("order", self.order_kind),
            )
            if saved.get(key) != now
        ]
        if changed:
            log.warning(
                "resuming mid-epoch %d, but the training order changed since the checkpoint (%s): this epoch "
                "restarts from its first batch, so the resumed run is not identical to an uninterrupted one",
                epoch,
                ", ".join(changed),
            )
            self._skip = None
            return
        consumed = int(state["consumed"])
        self._skip = (epoch, consumed)
        self._iter_epoch = epoch
        # a checkpoint written before the resumed iteration starts records the same position
        self.consumed_batches = self.batches_done_after(consumed)
        self._start = (consumed, self.consumed_batches)


def aspect_ratio_flags(sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """The orientation group of each image: 1 where width / height > 1 (landscape), else 0.

    As MMDetection 2.x ``CustomDataset._set_group_flag`` (``mmdet/datasets/custom.py``): from the
    sizes in the annotation file, before any transform, so square images go with the portrait ones
    (a keep-ratio resize keeps the orientation, so the flag still holds after it).

    Args:
        sizes: ``(height, width)`` of each image, ``N`` pairs.

    Returns:
        ``(N,)`` uint8 flags.
    """
    hw = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    return (hw[:, 1] > hw[:, 0]).astype(np.uint8)


def grouped_order(
    order: Sequence[int], flags: np.ndarray, chunk: int, generator: torch.Generator | None = None
) -> list[int]:
    """``order`` rearranged so that each run of ``chunk`` positions holds one group's indices.

    Each group keeps its indices in their order in ``order`` and is cut into runs of ``chunk``;
    the full runs of all groups are shuffled with ``generator`` (without one they stay group by
    group). Every index appears exactly once: the groups' leftovers (fewer than ``chunk`` each)
    come last, group after group, so with two groups only the run where the first group's leftovers
    meet the second's can mix them. MMDetection's ``DistributedGroupSampler``
    (``mmdet/datasets/samplers/group_sampler.py``) pads each group with repeats instead, which
    makes the epoch longer and shows some images twice. With one group ``order`` is returned as it is.

    Args:
        order: ``(N,)`` a permutation of ``range(N)``.
        flags: ``(N,)`` the group of each index (:func:`aspect_ratio_flags`).
        chunk: positions per run, the samples of one training step (batch size x processes).
        generator: draws the order of the runs.

    Returns:
        ``N`` indices.
    """
    order_np = np.asarray(order, dtype=np.int64)
    groups = [order_np[flags[order_np] == flag] for flag in np.unique(flags)]
    if len(groups) <= 1:
        return list(order)
    runs: list[np.ndarray] = []
    tail: list[np.ndarray] = []
    for members in groups:
        full = len(members) // chunk * chunk
        runs += np.split(members[:full], full // chunk) if full else []
        tail.append(members[full:])
    if generator is not None and runs:
        runs = [runs[i] for i in torch.randperm(len(runs), generator=generator).tolist()]
    return np.concatenate(runs + tail).tolist()


class GroupedResumableSampler(ResumableSampler):
    """:class:`ResumableSampler` whose training steps each hold images of one orientation.

    As MMDetection 2.x's ``GroupSampler`` / ``DistributedGroupSampler``
    (``mmdet/datasets/samplers/group_sampler.py``): a batch of a landscape and a portrait image
    is padded to the longer side both ways (1088x1088 for two 640x480 COCO images resized to short
    side 800, 28 % padding), a batch of one orientation far less. The epoch's order is
    :func:`grouped_order` of the plain sampler's permutation, with runs of one step's samples
    (``batch_size * num_replicas``): rank ``r`` takes positions ``r, r + R, ...``, so each rank's
    ``k``-th batch lies in the ``k``-th run. The order is a function of ``(seed, epoch)`` and the
    run length; resuming skips the consumed positions as the plain sampler does.

    Remainder: every image is seen exactly once per epoch (beyond the plain sampler's repeats
    that make the epoch divide evenly among processes); the step where the landscape leftovers
    meet the portrait ones, near the epoch's end, is the only one that mixes.

    A run resumed mid-epoch with another batch size or number of processes finishes that epoch in
    the checkpoint's order (so no image is skipped or repeated), whose runs no longer match the
    steps: those batches may mix. The next epoch is grouped by the new step.

    Args:
        dataset: the training set, ``N`` samples.
        batch_size: samples per batch on each process.
        flags: ``(N,)`` the group of each sample (:func:`aspect_ratio_flags`).
        shuffle, seed, num_replicas, rank: as :class:`ResumableSampler`.
    """

    order_kind = "aspect_ratio_groups"

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        flags: Sequence[int] | np.ndarray,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(dataset, batch_size, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank)
        self.flags = np.asarray(flags).reshape(-1)
        n = len(dataset)  # type: ignore[arg-type]
        if len(self.flags) != n:
            raise ValueError(f"GroupedResumableSampler: {len(self.flags)} flags for {n} samples")
        # the run length the current epoch's order is built with, and that of a resumed epoch
        self.chunk = self.batch_size * self.num_replicas
        self._resumed_chunk: tuple[int, int] | None = None  # (epoch, run length)

    def _epoch_order(self, n: int) -> list[int]:
        chunk = self.batch_size * self.num_replicas
        if self._resumed_chunk is not None and self._resumed_chunk[0] == self.epoch:
            chunk = self._resumed_chunk[1]
        self.chunk = chunk
        if not self.shuffle:
            return grouped_order(range(n), self.flags, chunk)
        # one stream: the plain sampler's permutation, then the order of the runs
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return grouped_order(torch.randperm(n, generator=g).tolist(), self.flags, chunk, g)

    def state_dict(self, epoch_done: bool = False) -> dict[str, Any]:
        return {**super().state_dict(epoch_done), "group_chunk": self.chunk}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._resumed_chunk = None
        if self._skip is None:  # a new epoch, or this one restarted: grouped by the new step
            return
        chunk = int(state.get("group_chunk", state.get("samples_per_step", self.batch_size * self.num_replicas)))
        self._resumed_chunk = (self._skip[0], chunk)
        self.chunk = chunk
        if chunk != self.batch_size * self.num_replicas:
            log.warning(
                "resuming mid-epoch %d in the checkpoint's aspect-ratio groups of %d samples per step (now %d): "
                "the rest of this epoch may mix orientations in a batch; the next epoch is grouped anew",
                self._skip[0],
                chunk,
                self.batch_size * self.num_replicas,
            )


def continue_by_sample_count(trainer: Any, sampler: ResumableSampler, state: dict[str, Any]) -> None:
    """After a resume mid-epoch with another batch size (or number of processes), sets the
    training loop's batch count of that epoch to the batches of the new size that the consumed
    samples account for (:meth:`ResumableSampler.batches_done_after`).

    Lightning restores the count of batches of the checkpoint's size and ends the epoch when the
    count reaches the loader's length: with a larger batch it would stop before the rest of the
    epoch was trained. Runs after Lightning restored its loops and before the epoch loop resets
    (which copies ``completed`` into the other counters, after adding the batch whose end the
    checkpoint was written at).
    """
    position = sampler.resumed_position()
    before, now = state.get("samples_per_step"), sampler.batch_size * sampler.num_replicas
    if trainer is None or position is None or before is None or int(before) == now:
        return
    epoch, consumed = position
    done = sampler.batches_done_after(consumed)
    total = trainer.fit_loop.epoch_loop.batch_progress.total
    at_batch_end = (
        total.started == total.ready and total.processed == total.started and total.completed == total.processed - 1
    )
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    current.ready = current.started = current.processed = done
    current.completed = done - 1 if at_batch_end else done
    log.warning(
        "resuming mid-epoch %d with %d samples per step instead of the checkpoint's %d (batch size x processes): "
        "the epoch goes on by sample count after the %d of %d samples already trained, none skipped or repeated",
        epoch,
        now,
        int(before),
        consumed,
        len(sampler.dataset),
    )


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
