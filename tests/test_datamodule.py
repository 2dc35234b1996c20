"""Data modules on a tiny generated synthetic data set (6 train, 3 val images of 64 px)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader
from omegaconf import OmegaConf
from torch import Tensor
from torch.utils.data import DistributedSampler

from knet_lightning.data.coco import COCOPanopticDataModule, COCOPanopticDataset
from knet_lightning.data.meta import DatasetError
from knet_lightning.data.synthetic import SyntheticPanopticDataModule, generate_synthetic_panoptic
from knet_lightning.data.transforms import ResizeShortestEdge

GEN = {"num_train": 6, "num_val": 3, "image_size": 64, "seed": 0, "max_objects": 3}
NUM_CLASSES = 7  # 4 shapes + 3 stuff


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_panoptic(tmp_path_factory.mktemp("synthetic") / "shapes", **GEN)


def check_batch(batch: dict, batch_size: int, padded: tuple[int, int] | None = None) -> None:
    images = batch["images"]
    assert type(images) is Tensor and images.dtype == torch.float32
    assert images.shape[:2] == (batch_size, 3)
    assert images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    if padded is not None:
        assert images.shape[2:] == padded
    assert len(batch["image_sizes"]) == len(batch["targets"]) == batch_size
    for i, ((h, w), target) in enumerate(zip(batch["image_sizes"], batch["targets"])):
        assert h <= images.shape[2] and w <= images.shape[3]
        k = target["labels"].shape[0]
        assert k > 0
        assert target["masks"].shape == (k, h, w) and target["masks"].dtype == torch.bool
        assert target["labels"].dtype == torch.int64 and target["iscrowd"].shape == (k,)
        assert bool(((target["labels"] >= 0) & (target["labels"] < NUM_CLASSES)).all())
        assert target["sem_seg"].shape == (h, w) and target["sem_seg"].dtype == torch.int64
        present = set(target["sem_seg"].unique().tolist()) - {255}
        assert present <= set(target["labels"].tolist())
        assert target["panoptic"].shape == target["orig_size"] == (64, 64)
        # the collate pads with zeros beyond the image's own size
        assert bool((images[i, :, h:, :] == 0).all()) and bool((images[i, :, :, w:] == 0).all())


def test_class_info_is_known_before_any_file_exists(tmp_path: Path) -> None:
    dm = SyntheticPanopticDataModule(tmp_path / "not_yet", **GEN)
    info = dm.class_info
    assert (info.num_things, info.num_stuff, info.num_classes) == (4, 3, NUM_CLASSES)
    assert (dm.num_things, dm.num_stuff, dm.num_classes) == (4, 3, NUM_CLASSES)
    assert info.names[:4] == ("circle", "square", "triangle", "ring")
    assert not (tmp_path / "not_yet").exists()


def test_setup_generates_when_prepare_data_was_skipped(tmp_path: Path) -> None:
    dm = SyntheticPanopticDataModule(tmp_path / "shapes", batch_size=3, **GEN)
    expected = dm.class_info
    dm.setup("fit")
    assert (tmp_path / "shapes" / "done").is_file()
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 3
    # the JSON categories give the same classes as the generator's constants
    assert dm.class_info == expected == COCOPanopticDataset(tmp_path / "shapes", split="val").class_info


def test_train_and_val_loaders_without_workers(root: Path) -> None:
    dm = SyntheticPanopticDataModule(root, batch_size=4, val_batch_size=2, num_workers=0, **GEN)
    dm.prepare_data()  # idempotent on an existing data set
    dm.setup("fit")
    train_batches = list(dm.train_dataloader())
    assert [b["images"].shape[0] for b in train_batches] == [4, 2]  # drop_last=False
    for batch in train_batches:
        check_batch(batch, batch["images"].shape[0], padded=(64, 64))
    ids = sorted(t["image_id"] for b in train_batches for t in b["targets"])
    assert len(set(ids)) == 6
    val_batches = list(dm.val_dataloader())
    assert [b["images"].shape[0] for b in val_batches] == [2, 1]
    for batch in val_batches:
        check_batch(batch, batch["images"].shape[0], padded=(64, 64))


def test_pin_memory_only_for_an_accelerator(root: Path) -> None:
    from types import SimpleNamespace

    dm = SyntheticPanopticDataModule(root, batch_size=2, pin_memory=True, **GEN)
    dm.setup("fit")
    for device, pinned in (("cpu", False), ("cuda", True)):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        assert dm.train_dataloader().pin_memory is pinned and dm.val_dataloader().pin_memory is pinned
    dm.trainer = None  # no trainer: a GPU's presence decides
    assert dm.train_dataloader().pin_memory is torch.cuda.is_available()
    assert SyntheticPanopticDataModule(root, pin_memory=False, **GEN)._pins() is False


def test_loaders_with_one_worker_and_multiscale(root: Path) -> None:
    dm = SyntheticPanopticDataModule(
        root,
        batch_size=3,
        num_workers=1,
        train_kind="multiscale",
        train_short_edge=(64, 100),
        train_max_size=200,
        **GEN,
    )
    dm.setup("fit")
    sizes = []
    for batch in dm.train_dataloader():
        check_batch(batch, 3)
        for h, w in batch["image_sizes"]:
            assert h == w and 64 <= h <= 100
            sizes.append(h)
        assert batch["images"].shape[2] == -(-max(s[0] for s in batch["image_sizes"]) // 32) * 32
    assert len(sizes) == 6
    # validation is deterministic and in file order
    first = [t["image_id"] for b in dm.val_dataloader() for t in b["targets"]]
    second = [t["image_id"] for b in dm.val_dataloader() for t in b["targets"]]
    assert first == second == [dm.datasets["val"].image_info(i)["image_id"] for i in range(3)]


def test_lsj_through_the_data_module(root: Path) -> None:
    dm = SyntheticPanopticDataModule(root, batch_size=2, train_kind="lsj", crop_size=48, **GEN)
    for batch in dm.train_dataloader():  # sets itself up on first use
        check_batch(batch, 2, padded=(64, 64))
        assert batch["image_sizes"] == [(48, 48), (48, 48)]
        for target in batch["targets"]:
            assert bool(target["masks"].flatten(1).any(1).all())


def test_test_loader(root: Path) -> None:
    dm = SyntheticPanopticDataModule(root, val_batch_size=3, eval_short_edge=96, eval_max_size=96,
                                     mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), **GEN)  # fmt: skip
    dm.setup("test")
    (batch,) = list(dm.test_dataloader())
    check_batch(batch, 3, padded=(96, 96))
    assert batch["image_sizes"] == [(96, 96)] * 3
    # the batch carries the data module's normalisation, which the overlays undo
    assert (batch["mean"], batch["std"]) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def test_training_loader_shards_itself_under_ddp(root: Path) -> None:
    # the training sampler is a DistributedSampler (resumable mid-epoch), so Lightning keeps it
    # under DDP instead of replacing it; each rank reads its own half of the shuffled order
    from knet_lightning.data.sampling import ResumableSampler

    dm = SyntheticPanopticDataModule(root, batch_size=2, **GEN)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train.sampler, DistributedSampler) and not _is_dataloader_shuffled(val)
    seen = []
    for rank in (0, 1):
        sampler = ResumableSampler(train.dataset, batch_size=2, seed=0, num_replicas=2, rank=rank)
        replaced = _update_dataloader(train, sampler)
        assert replaced.sampler is sampler and replaced.collate_fn is train.collate_fn
        batches = list(replaced)
        assert sum(b["images"].shape[0] for b in batches) == 3  # this rank's half of 6
        check_batch(batches[0], 2, padded=(64, 64))
        seen += [index for _, index in sampler]
    assert sorted(seen) == list(range(6))


def test_hydra_instantiation_with_plain_args(root: Path) -> None:
    cfg = OmegaConf.create(
        {
            "_target_": "knet_lightning.data.synthetic.SyntheticPanopticDataModule",
            "root": str(root),
            **GEN,
            "batch_size": 2,
            "train_kind": "multiscale",
            "train_short_edge": [64, 80],
            "scale_range": [0.5, 1.5],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
        }
    )
    dm = instantiate(cfg)
    assert isinstance(dm, SyntheticPanopticDataModule)
    resize = next(t for t in dm.train_transforms.transforms if isinstance(t, ResizeShortestEdge))
    assert resize.short_edge == (64, 80)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, 2)


def test_moved_data_modules_keep_their_old_target() -> None:
    """Checkpoints store the data config with the ``_target_`` of their day (mode=eval reads it):
    the data modules that moved beside their readers still resolve by their old path."""
    from hydra.utils import get_class

    assert get_class("knet_lightning.data.datamodule.COCOPanopticDataModule") is COCOPanopticDataModule
    assert get_class("knet_lightning.data.datamodule.SyntheticPanopticDataModule") is SyntheticPanopticDataModule
    with pytest.raises(ImportError):
        get_class("knet_lightning.data.datamodule.NoSuchDataModule")


def test_coco_module_reads_the_same_files(root: Path) -> None:
    dm = COCOPanopticDataModule(root, val_batch_size=3, eval_short_edge=None)
    assert dm.class_info.num_classes == NUM_CLASSES  # read from the val JSON
    (batch,) = list(dm.val_dataloader())
    check_batch(batch, 3, padded=(64, 64))


def test_bad_settings_and_paths_fail_clearly(tmp_path: Path, root: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticPanopticDataModule(root, batch_size=0, **GEN)
    with pytest.raises(ValueError, match="kind"):
        SyntheticPanopticDataModule(root, train_kind="mosaic", **GEN)
    with pytest.raises(ValueError, match="stage"):
        SyntheticPanopticDataModule(root, **GEN).setup("train")
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        _ = COCOPanopticDataModule(missing).class_info
    with pytest.raises(DatasetError, match="nowhere"):
        COCOPanopticDataModule(missing).setup("fit")


class _RecordSamples(__import__("lightning").pytorch.LightningModule):
    """Trains one weight and records the image ids of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.seen += [int(t["image_id"]) for t in batch["targets"]]
        return (self.w - batch["images"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.w], lr=0.1)


@pytest.mark.parametrize(("before", "after", "steps"), [(2, 4, 2), (4, 2, 1), (2, 3, 1)])
def test_resume_with_another_batch_size_trains_every_sample_once(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, before: int, after: int, steps: int
) -> None:
    """Resumed mid-epoch with a new batch size, the epoch goes on by sample count: the samples
    of the two runs are the epoch's 6, each once, and a warning says what changed."""
    from lightning.pytorch import Callback, Trainer

    class Kill(Exception):
        pass

    class CheckpointThenKill(Callback):
        """A step checkpoint (as ModelCheckpoint writes it) and then the process dies."""

        def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
            if trainer.global_step == steps:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
                raise Kill

    def fit(batch_size: int, resume: bool) -> _RecordSamples:
        dm = SyntheticPanopticDataModule(root, batch_size=batch_size, num_workers=0, **GEN)
        module = _RecordSamples()
        trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                          callbacks=[] if resume else [CheckpointThenKill()])  # fmt: skip
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=tmp_path / "mid.ckpt" if resume else None)
        except Kill:
            pass
        return module

    first = fit(before, resume=False)
    assert len(first.seen) == before * steps
    with caplog.at_level("WARNING", logger="knet_lightning.data.sampling"):
        second = fit(after, resume=True)
    assert sorted(first.seen + second.seen) == list(range(1, 7))
    assert f"{after} samples per step instead of the checkpoint's {before}" in caplog.text
