"""The base of the Lightning data modules: data sets per split, transforms and loaders with the
batch collate. Each data set's own data module sits beside its reader (``coco.py``,
``coco_instance.py``, ``cityscapes/``, ``ade20k.py``, ``semantic_folder.py``, ``synthetic.py``)
and implements :meth:`SegmentationDataModule.make_dataset`.

A batch is ``{"images": (B, 3, Hp, Wp) float, "image_sizes": [(h, w)], "targets": [dict]}``
(see :func:`knet_lightning.data.transforms.collate_batch`). The training loader's sampler
shards itself under DDP; the evaluation loaders' repeat no image (``eval_sampler``).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from knet_lightning.data.meta import ClassInfo, DatasetError
from knet_lightning.data.resize import check_backend
from knet_lightning.data.sampling import (
    BAD_SAMPLE_POLICIES,
    GroupedResumableSampler,
    ResumableDataLoader,
    ResumableSampler,
    SeededSamples,
    aspect_ratio_flags,
    continue_by_sample_count,
)
from knet_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transforms,
    collate_batch,
    eval_pipeline_settings,
)
from knet_lightning.runtime.distributed import eval_sampler

log = logging.getLogger(__name__)

__all__ = ["SegmentationDataModule", "role_splits"]

# Data modules that lived here once, and where they are now: the data config a checkpoint stores
# (``knet_data_config``, which mode=eval reads) names its class by this module's path in ``_target_``.
_MOVED = {
    "COCOPanopticDataModule": "knet_lightning.data.coco",
    "SyntheticPanopticDataModule": "knet_lightning.data.synthetic",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Transforms = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]

# The splits a run reads; mode=predict reads the images of `inputs=` (inference/predict.py), not a split.
_ROLES = ("train", "val", "test")


def role_splits(train_split: str, val_split: str, test_split: str) -> dict[str, str]:
    """The split name each role of ``_ROLES`` reads."""
    return {"train": train_split, "val": val_split, "test": test_split}


class SegmentationDataModule(L.LightningDataModule, ABC):
    """Base data module: split data sets, train/eval transforms and loaders.

    Subclasses implement :meth:`make_dataset` (and :meth:`read_class_info` when the
    classes can be known without building a data set).

    Args:
        batch_size: training images per device.
        val_batch_size: evaluation images per device (``None``: ``batch_size``).
        num_workers: loader worker processes per device.
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies); only where
            the trainer runs on an accelerator.
        persistent_workers: keep workers alive between epochs (only with workers).
        train_kind: ``"resize"``, ``"multiscale"`` or ``"lsj"`` (see ``build_transforms``).
        train_short_edge: training short side; an int, a ``(low, high)`` range for
            ``multiscale``, or ``None`` for no resize.
        train_max_size: cap on the training long side (``None``: no cap).
        crop_size: LSJ output size (int or ``(h, w)``).
        scale_range: LSJ random scale range.
        flip_prob: horizontal flip probability in training.
        eval_short_edge, eval_max_size: single-scale evaluation resize (``None``: keep size).
        size_divisor: padded batch sides are multiples of it.
        mean, std: normalisation on the 0-1 scale, RGB.
        resize_backend: the keep-ratio resizes' pixel arithmetic: ``"cv2"`` (default: the
            references' ``mmcv.imrescale``, OpenCV bilinear without antialiasing) or
            ``"torchvision"`` (antialiased); see :mod:`knet_lightning.data.resize`.
        on_bad_sample: ``"error"`` (default): a training sample with a missing or corrupt file
            stops the run with the reader's error; ``"skip"``: it is logged, replaced by the next
            sample and counted (``BadSampleReport``). Evaluation always stops: metrics over a
            silently different image set would not be comparable.
        sampler_seed: seed of the training order and of the per-sample augmentation draws
            (``None``: the run's ``seed``, which ``seed_everything`` exports as ``PL_GLOBAL_SEED``).
        group_by_aspect_ratio: each training step holds only landscape or only portrait images
            (:class:`GroupedResumableSampler`, from the training set's ``image_sizes()``), so that
            a batch is padded to its own orientation, not to a square; for keep-ratio resizes
            (a fixed-size crop pads nothing to begin with).
    """

    def __init__(
        self,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        train_kind: str = "resize",
        train_short_edge: int | Sequence[int] | None = 800,
        train_max_size: int | None = 1333,
        crop_size: int | Sequence[int] = 1024,
        scale_range: Sequence[float] = (0.1, 2.0),
        flip_prob: float = 0.5,
        eval_short_edge: int | None = 800,
        eval_max_size: int | None = 1333,
        size_divisor: int = 32,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_bad_sample: str = "error",
        sampler_seed: int | None = None,
        group_by_aspect_ratio: bool = False,
        resize_backend: str = "cv2",
    ) -> None:
        super().__init__()
        self.resize_backend = check_backend(resize_backend, f"{type(self).__name__}: data.resize_backend")
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(
                f"{type(self).__name__}: data.on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}"
            )
        self.on_bad_sample = on_bad_sample
        self.sampler_seed = sampler_seed
        self.group_by_aspect_ratio = bool(group_by_aspect_ratio)
        self._train_sampler: ResumableSampler | None = None
        self._sampler_state: dict[str, Any] | None = None
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"{type(self).__name__}: val_batch_size must be >= 1, got {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"{type(self).__name__}: num_workers must be >= 0, got {num_workers}")
        if size_divisor < 1:
            raise ValueError(f"{type(self).__name__}: size_divisor must be >= 1, got {size_divisor}")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.size_divisor = int(size_divisor)
        # the batches carry the normalisation, so that overlays undo this one (not ImageNet's)
        self.collate = partial(collate_batch, size_divisor=self.size_divisor, mean=tuple(mean), std=tuple(std))
        # Built now, so that a bad setting fails at instantiation, not in a worker.
        self.train_transforms = build_transforms(
            True,
            kind=train_kind,
            short_edge=_plain_size(train_short_edge),
            max_size=train_max_size,
            crop_size=_plain_size(crop_size),
            scale_range=tuple(scale_range),
            flip_prob=flip_prob,
            mean=tuple(mean),
            std=tuple(std),
            resize_backend=self.resize_backend,
        )
        self.eval_transforms = build_transforms(
            False, short_edge=_plain_size(eval_short_edge), max_size=eval_max_size, mean=tuple(mean), std=tuple(std),
            resize_backend=self.resize_backend,
        )  # fmt: skip
        self.datasets: dict[str, Dataset] = {}
        self._class_info: ClassInfo | None = None

    # ----------------------------------------------------------- subclass API

    def inference_settings(self) -> dict[str, Any]:
        """The test-time preprocessing and class ids a trained model needs to run on new images,
        read from the evaluation pipeline (keep-ratio resize, normalisation) and the collate
        padding: ``short_edge`` / ``max_size`` (None: no resize), ``resize_backend`` (its pixel
        arithmetic), ``mean`` / ``std`` (0-1 scale, RGB), ``size_divisor`` and ``dataset_ids``
        (the data set's id of each class).
        Stored in checkpoints (``knet_inference``) for :class:`knet_lightning.Segmenter`."""
        pipeline = eval_pipeline_settings(self.eval_transforms, type(self).__name__)
        return {
            "short_edge": pipeline["short_edge"],
            "max_size": pipeline["max_size"],
            "resize_backend": self.resize_backend,
            "mean": pipeline["mean"],
            "std": pipeline["std"],
            "size_divisor": self.size_divisor,
            "dataset_ids": list(self.class_info.dataset_ids),
        }

    def keep_eval_size(self) -> None:
        """Evaluation images at their original size: :attr:`eval_transforms` becomes its own
        normalisation alone (``ToDtype(float32, scale=True)`` + ``Normalize``, mean/std of the
        pipeline), without the resize. For multi-scale + flip (``model.test_time.tta``), which
        resizes the original image itself (:mod:`knet_lightning.inference.test_time`). Call it before
        :meth:`setup` builds the evaluation sets, and after :meth:`inference_settings` (which
        reads the single-scale resize from the pipeline)."""
        ops = getattr(self.eval_transforms, "transforms", [])
        normalize = [op for op in ops if isinstance(op, v2.Normalize)]
        if len(normalize) != 1:
            raise ValueError(f"{type(self).__name__}.keep_eval_size: expected one Normalize in the evaluation "
                             f"pipeline, got {ops}")  # fmt: skip
        built = [role for role in ("val", "test") if role in self.datasets]
        if built:
            raise RuntimeError(f"{type(self).__name__}.keep_eval_size: the {built} data sets are built already "
                               "with the resizing pipeline; call it before setup()")  # fmt: skip
        self.eval_transforms = build_transforms(False, short_edge=None, mean=normalize[0].mean, std=normalize[0].std)

    @abstractmethod
    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        """The data set for ``role`` (``"train"``, ``"val"`` or ``"test"``)."""

    def read_class_info(self) -> ClassInfo:
        """Classes without a prepared split; the default builds the validation data set."""
        return _class_info_of(self.make_dataset("val", self.eval_transforms), "val")

    # -------------------------------------------------------------- classes

    @property
    def class_info(self) -> ClassInfo:
        """Contiguous classes, things first; readable before ``setup`` (the model needs it first)."""
        if self._class_info is None:  # setup() sets it from the data sets it builds
            self._class_info = self.read_class_info()
        return self._class_info

    @property
    def num_classes(self) -> int:
        return self.class_info.num_classes

    @property
    def num_things(self) -> int:
        return self.class_info.num_things

    @property
    def num_stuff(self) -> int:
        return self.class_info.num_stuff

    def _set_class_info(self, info: ClassInfo, role: str) -> ClassInfo:
        # Splits of one data set must agree, or labels would mean different classes.
        if self._class_info is not None and self._class_info != info:
            raise DatasetError(
                f"{type(self).__name__}: the {role} split's categories {info.names} differ from "
                f"the other splits' {self._class_info.names}"
            )
        self._class_info = info
        return info

    # --------------------------------------------------------------- set-up

    def setup(self, stage: str | None = None) -> None:
        """Builds the data sets the stage needs (``fit``, ``validate``, ``test``; ``predict``
        needs none; ``None``: all)."""
        roles = {
            None: _ROLES,
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            # Lightning sets an attached data module up for trainer.predict too; predict reads
            # the loader it is given (a folder of images, or the test split for exports)
            "predict": (),
        }
        if stage not in roles:
            raise ValueError(f"{type(self).__name__}.setup: unknown stage {stage!r}; expected one of {list(roles)}")
        for role in roles[stage]:
            if role not in self.datasets:
                transforms = self.train_transforms if role == "train" else self.eval_transforms
                dataset = self.make_dataset(role, transforms)
                self._set_class_info(_class_info_of(dataset, role), role)
                self.datasets[role] = dataset
                self._warn_if_enlarged(role, dataset, transforms)

    # a resize that enlarges the typical image more than this is worth a warning: it costs time and
    # memory and invents no detail (a COCO recipe's short side 800 on a data set of 128 px images)
    ENLARGE_WARNING = 2.0

    def keep_size_hint(self, short_side: int) -> str:
        """The overrides that keep images of ``short_side`` px near their own size."""
        return (f"data.train_short_edge={short_side} data.eval_short_edge={short_side} (or null: no resize), with "
                "data.train_max_size / data.eval_max_size to match")  # fmt: skip

    def _warn_if_enlarged(self, role: str, dataset: Dataset, transforms: Any) -> None:
        """Warns when ``transforms`` resize the split's median image by more than
        :attr:`ENLARGE_WARNING`, naming the factor and the overrides that keep the images' size."""
        ops = [op for op in getattr(transforms, "transforms", []) if hasattr(op, "nominal_size")]
        if not ops or len(dataset) == 0:
            return
        # a sample of 100: where sizes come from image headers, reading all of a large set takes seconds
        indices = range(0, len(dataset), max(1, len(dataset) // 100))
        if hasattr(dataset, "image_size"):
            sample = [dataset.image_size(i) for i in indices]
        elif hasattr(dataset, "image_sizes"):
            sizes = dataset.image_sizes()
            sample = [sizes[i] for i in indices]
        else:
            return
        h, w = (int(v) for v in torch.tensor(sample, dtype=torch.float64).median(dim=0).values)
        new_h, new_w = ops[0].nominal_size(h, w)
        if new_h / h > self.ENLARGE_WARNING:
            log.warning("the %s resize enlarges this data set's images %.1fx (median %dx%d px -> %dx%d): slower, and no "
                        "detail is gained; keep them near their size with %s", role, new_h / h, h, w, new_h, new_w,
                        self.keep_size_hint(min(h, w)))  # fmt: skip

    def _dataset(self, role: str) -> Dataset:
        if role not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[role])
        return self.datasets[role]

    # -------------------------------------------------------------- loaders

    def _loader(self, role: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self._dataset(role)
        # Under DDP, evaluation splits get a sampler that repeats no image (Lightning's
        # DistributedSampler pads with repeats, which PQ / mIoU would count twice); training
        # uses train_dataloader's ResumableSampler, which shards itself.
        sampler = None if role == "train" else eval_sampler(dataset, getattr(self, "trainer", None))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=self._pins(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=False,
            # a loader's own generator seeds its workers: starting an iterator must not draw
            # from the global RNG, or a resumed run's dropout draws would shift
            generator=torch.Generator().manual_seed(self._seed()),
        )

    def _pins(self) -> bool:
        """``pin_memory`` where it helps: page-locked batches only speed up copies to a GPU, and a
        CPU run would pin for nothing (and torch warns of it)."""
        if not self.pin_memory:
            return False
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type != "cpu"
        return torch.cuda.is_available()

    def _seed(self) -> int:
        if self.sampler_seed is not None:
            return int(self.sampler_seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> DataLoader:
        """Shuffled and resumable mid-epoch (:class:`ResumableSampler`, a ``DistributedSampler``
        that shards itself under DDP, so Lightning does not replace it; grouped by orientation with
        ``group_by_aspect_ratio``), augmentations seeded per (seed, epoch, sample)
        (:class:`SeededSamples`)."""
        seed = self._seed()
        train = self._dataset("train")
        dataset = SeededSamples(train, seed=seed, on_bad_sample=self.on_bad_sample)
        sampler: ResumableSampler
        if self.group_by_aspect_ratio:
            flags = aspect_ratio_flags(_image_sizes_of(train))
            log.info("aspect-ratio groups of the training set: %d landscape, %d portrait or square",
                     int(flags.sum()), int(len(flags) - flags.sum()))  # fmt: skip
            sampler = GroupedResumableSampler(dataset, self.batch_size, flags, shuffle=True, seed=seed)
        else:
            sampler = ResumableSampler(dataset, batch_size=self.batch_size, shuffle=True, seed=seed)
        if self._sampler_state is not None:
            sampler.load_state_dict(self._sampler_state)
            continue_by_sample_count(self.trainer, sampler, self._sampler_state)
            self._sampler_state = None
        self._train_sampler = sampler
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=self._pins(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=False,
            generator=torch.Generator().manual_seed(seed),
        )

    # ------------------------------------------------------ resumable position

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # called when the training loop takes a batch (after any prefetching), so the count
        # is what the weights have seen
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_sampler is not None:
            self._train_sampler.mark_consumed()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training position (in every checkpoint). Also kept here, not only in the loader's
        state that Lightning restores mid-epoch: after an epoch-end checkpoint Lightning starts the
        next epoch's iterator before it sets the sampler's epoch, so the sampler must know it."""
        sampler = self._train_sampler
        if sampler is None:
            return {}
        trainer = self.trainer
        done = bool(trainer is not None and sampler.consumed_batches >= trainer.num_training_batches)
        return {"train_sampler": sampler.state_dict(epoch_done=done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sampler_state = state_dict.get("train_sampler")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, shuffle=False)


def _plain_size(value: Any) -> Any:
    """OmegaConf lists (from Hydra) -> tuples; ints and ``None`` unchanged."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(int(v) for v in value)
    return value


def _image_sizes_of(dataset: Dataset) -> list[tuple[int, int]]:
    """``(height, width)`` of each training image, as the reader gives them without decoding."""
    sizes = getattr(dataset, "image_sizes", None)
    if not callable(sizes):
        raise TypeError(
            f"data.group_by_aspect_ratio=true needs the training set's image sizes, but {type(dataset).__name__} "
            "has no image_sizes()"
        )
    return list(sizes())


def _class_info_of(dataset: Dataset, role: str) -> ClassInfo:
    info = getattr(dataset, "class_info", None)
    if not isinstance(info, ClassInfo):
        raise TypeError(f"the {role} data set {type(dataset).__name__} has no 'class_info' ClassInfo attribute")
    return info
