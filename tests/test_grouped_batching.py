"""Aspect-ratio grouped training batches (``data.group_by_aspect_ratio``, MMDetection's GroupSampler):
one orientation per step, every image once per epoch over the processes, resumable mid-epoch, the
readers' image sizes without decoding, and the experiments that turn it on."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from cli_utils import compose_cfg
from PIL import Image
from test_cityscapes import H as CS_H
from test_cityscapes import W as CS_W
from test_cityscapes import _write_fixture as write_cityscapes
from test_coco_instance import _write_fixture as write_coco_instance
from test_coco_panoptic import _photo_turned_by_exif
from test_coco_panoptic import _write_fixture as write_coco_panoptic

from knet_lightning.cli import build_datamodule
from knet_lightning.data.cityscapes import CityscapesSemanticDataset
from knet_lightning.data.coco import COCOPanopticDataModule, COCOPanopticDataset
from knet_lightning.data.coco_instance import COCOInstanceDataset
from knet_lightning.data.io import id2rgb, read_image_size
from knet_lightning.data.sampling import (
    GroupedResumableSampler,
    ResumableSampler,
    aspect_ratio_flags,
    grouped_order,
)

ROOT = Path(__file__).resolve().parents[1]


def _flags(landscape: int, portrait: int, seed: int = 0) -> np.ndarray:
    flags = np.array([1] * landscape + [0] * portrait, dtype=np.uint8)
    return np.random.default_rng(seed).permutation(flags)


def _epoch(flags: np.ndarray, batch_size: int, replicas: int, seed: int = 3, epoch: int = 0) -> list[list[int]]:
    """Each rank's indices of one epoch."""
    ranks = []
    for rank in range(replicas):
        sampler = GroupedResumableSampler(list(range(len(flags))), batch_size, flags, seed=seed,
                                          num_replicas=replicas, rank=rank)  # fmt: skip
        sampler.set_epoch(epoch)
        ranks.append([index for _, index in sampler])
    return ranks


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def test_flags_are_mmdetections_width_over_height() -> None:
    # (height, width): landscape 1; portrait and square 0, as mmdet's _set_group_flag
    assert aspect_ratio_flags([(480, 640), (640, 480), (500, 500), (427, 640)]).tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize(("landscape", "portrait"), [(24, 12), (23, 14)])
def test_every_step_holds_one_orientation_and_every_image_comes_once(landscape: int, portrait: int) -> None:
    """2 processes x 2 images: the steps built from full runs of 4 hold one orientation on both ranks;
    the two groups' leftovers meet in at most one step, at the end; the ranks together read each image
    once (37 images: the plain sampler's one repeat that evens the shards)."""
    flags = _flags(landscape, portrait)
    n = len(flags)
    ranks = _epoch(flags, batch_size=2, replicas=2)
    seen = sorted(ranks[0] + ranks[1])
    assert len(ranks[0]) == len(ranks[1]) == -(-n // 2)
    assert set(seen) == set(range(n)) and len(seen) - n == (n % 2)
    full_steps = landscape // 4 + portrait // 4
    mixed_steps = set()
    for rank in ranks:
        for step, batch in enumerate(_batches(rank, 2)):
            if len({int(flags[i]) for i in batch}) > 1:
                mixed_steps.add(step)
    assert all(step >= full_steps for step in mixed_steps) and len(mixed_steps) <= 1
    if landscape % 4 == 0 and portrait % 4 == 0:
        assert not mixed_steps
    # the step is one orientation on both ranks, not just each rank's batch
    for step in range(full_steps):
        assert len({int(flags[i]) for rank in ranks for i in _batches(rank, 2)[step]}) == 1


def test_the_order_is_a_function_of_seed_and_epoch() -> None:
    flags = _flags(30, 10)
    assert _epoch(flags, 2, 2) == _epoch(flags, 2, 2)
    assert _epoch(flags, 2, 2, epoch=1) != _epoch(flags, 2, 2)
    assert _epoch(flags, 2, 2, seed=4) != _epoch(flags, 2, 2)
    # one orientation only (Cityscapes): the plain sampler's order, nothing regrouped
    same = np.ones(40, dtype=np.uint8)
    plain = [[i for _, i in ResumableSampler(list(range(40)), 2, seed=3, num_replicas=2, rank=r)] for r in (0, 1)]
    assert _epoch(same, 2, 2) == plain
    assert grouped_order([2, 0, 1], np.array([0, 0, 0]), 4) == [2, 0, 1]


def test_resume_mid_epoch_gives_the_same_remaining_batches(caplog: pytest.LogCaptureFixture) -> None:
    flags = _flags(23, 14)
    data = list(range(len(flags)))
    full = _epoch(flags, batch_size=2, replicas=2)
    for done in (0, 3, 8):
        for rank in (0, 1):
            interrupted = GroupedResumableSampler(data, 2, flags, seed=3, num_replicas=2, rank=rank)
            iter(interrupted).__next__()
            for _ in range(done):
                interrupted.mark_consumed()
            state = interrupted.state_dict()
            assert (state["consumed"], state["group_chunk"]) == (done * 4, 4)
            resumed = GroupedResumableSampler(data, 2, flags, seed=3, num_replicas=2, rank=rank)
            resumed.load_state_dict(state)
            assert [i for _, i in resumed] == full[rank][done * 2 :]
    # onto one process (2 per step instead of 4): the rest of the epoch in the checkpoint's runs, each
    # image once, with a warning; the next epoch is grouped by the new step
    one = GroupedResumableSampler(data, 2, flags, seed=3, num_replicas=1, rank=0)
    with caplog.at_level(logging.WARNING, logger="knet_lightning.data.sampling"):
        one.load_state_dict({**state, "consumed": 12})
    rest = [i for _, i in one]  # the 25 images the two ranks had not reached, each once
    assert len(rest) == len(set(rest)) == 25 and set(rest) == set(data) - set(full[0][:6] + full[1][:6])
    assert "groups of 4 samples per step (now 2)" in caplog.text
    one.set_epoch(1)
    batches = _batches([i for _, i in one], 2)
    assert sum(len({int(flags[i]) for i in b}) > 1 for b in batches) <= 1 and one.state_dict()["group_chunk"] == 2


def test_a_plain_checkpoint_restarts_the_epoch_in_groups(caplog: pytest.LogCaptureFixture) -> None:
    # the plain order's consumed positions say nothing about the grouped order: start the epoch over
    flags = _flags(10, 6)
    plain = ResumableSampler(list(range(16)), 2, seed=3)
    iter(plain).__next__()
    plain.mark_consumed()
    grouped = GroupedResumableSampler(list(range(16)), 2, flags, seed=3)
    with caplog.at_level(logging.WARNING, logger="knet_lightning.data.sampling"):
        grouped.load_state_dict(plain.state_dict())
    assert "order plain -> aspect_ratio_groups" in caplog.text
    assert [i for _, i in grouped] == _epoch(flags, 2, 1)[0]


def test_readers_give_image_sizes_without_decoding(tmp_path: Path) -> None:
    write_coco_panoptic(tmp_path / "pan")
    assert COCOPanopticDataset(tmp_path / "pan", split="val").image_sizes() == [(24, 32), (16, 20), (16, 16)]
    write_coco_instance(tmp_path / "inst", split="val")
    inst = COCOInstanceDataset(tmp_path / "inst", split="val")
    expected = [(inst.image_info(i)["height"], inst.image_info(i)["width"]) for i in range(len(inst))]
    assert inst.image_sizes() == expected and len(expected) > 0
    write_cityscapes(tmp_path / "cs")
    cs = CityscapesSemanticDataset(tmp_path / "cs", split="train")
    assert cs.image_sizes() == [(CS_H, CS_W)] * len(cs)
    # from the header, as read_rgb_image shows the photo: a 90-degree EXIF orientation swaps the sides
    _photo_turned_by_exif(tmp_path / "photo.png", np.zeros((10, 30, 3), np.uint8), 6)
    assert read_image_size(tmp_path / "photo.png") == (10, 30)


def _write_mixed_coco(root: Path) -> None:
    """COCO panoptic ``train``: 6 landscape 16x24 and 6 portrait 24x16 images, one segment each."""
    (root / "train2017").mkdir(parents=True)
    png_dir = root / "annotations" / "panoptic_train2017"
    png_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(12):
        h, w = (16, 24) if i % 2 else (24, 16)
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "train2017" / f"{i}.png")
        Image.fromarray(id2rgb(np.full((h, w), 7, np.uint32))).save(png_dir / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        annotations.append({"image_id": i + 1, "file_name": f"{i}.png",
                            "segments_info": [{"id": 7, "category_id": 1, "iscrowd": 0}]})  # fmt: skip
    categories = [{"id": 1, "name": "thing", "isthing": 1}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "panoptic_train2017.json").write_text(json.dumps(data))


def test_the_training_loader_pads_each_batch_to_its_own_orientation(tmp_path: Path) -> None:
    _write_mixed_coco(tmp_path / "coco")
    kwargs = {
        "train_split": "train",
        "val_split": "train",
        "batch_size": 2,
        "train_short_edge": None,
        "size_divisor": 8,
        "flip_prob": 0.0,
        "filter_min_size_train": 0,
    }  # the fixture's images are under mmdet's 32 px
    dm = COCOPanopticDataModule(tmp_path / "coco", group_by_aspect_ratio=True, sampler_seed=0, **kwargs)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, GroupedResumableSampler)
    padded = [tuple(batch["images"].shape[2:]) for batch in loader]
    assert len(padded) == 6 and set(padded) <= {(16, 24), (24, 16)}
    # the plain order with this seed pairs the two orientations, padded to 24x24
    plain = COCOPanopticDataModule(tmp_path / "coco", sampler_seed=0, **kwargs).train_dataloader()
    assert type(plain.sampler) is ResumableSampler
    assert (24, 24) in [tuple(batch["images"].shape[2:]) for batch in plain]


def test_a_run_resumed_mid_epoch_trains_the_grouped_batches_it_would_have(tmp_path: Path) -> None:
    """Through Lightning: killed after 2 of 6 steps and resumed from that checkpoint, the run trains
    the uninterrupted run's batches in its order, each of one orientation."""
    from lightning.pytorch import Callback, Trainer
    from test_datamodule import _RecordSamples

    _write_mixed_coco(tmp_path / "coco")

    class Kill(Exception):
        pass

    class CheckpointThenKill(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
            if trainer.global_step == 2:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
                raise Kill

    def fit(kill: bool, resume: bool) -> list[int]:
        dm = COCOPanopticDataModule(tmp_path / "coco", train_split="train", val_split="train", batch_size=2,
                                    train_short_edge=None, group_by_aspect_ratio=True, sampler_seed=1,
                                    filter_min_size_train=0)  # fmt: skip
        module = _RecordSamples()
        trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                          callbacks=[CheckpointThenKill()] if kill else [])  # fmt: skip
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=tmp_path / "mid.ckpt" if resume else None)
        except Kill:
            pass
        return module.seen

    whole = fit(kill=False, resume=False)
    assert sorted(whole) == list(range(1, 13))
    assert all(whole[i] % 2 == whole[i + 1] % 2 for i in range(0, 12, 2))  # odd ids are portrait
    assert fit(kill=True, resume=False) + fit(kill=False, resume=True) == whole


@pytest.mark.parametrize(
    ("experiment", "grouped"),
    [("knet_r50_coco_panoptic_ms3x", True), ("knet_r50_coco_instance_1x", True),
     ("knet_fcn_r50_ade20k_80k", False), ("knet_r50_cityscapes_panoptic_90k", True), ("synthetic", False)],
)  # fmt: skip
def test_keep_ratio_experiments_group_by_aspect_ratio(tmp_path: Path, experiment: str, grouped: bool) -> None:
    # the COCO experiments resize keeping the ratio; ADE20K and Cityscapes panoptic crop to a fixed size
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}"])
    assert cfg.data.group_by_aspect_ratio is grouped
    assert build_datamodule(cfg).group_by_aspect_ratio is grouped


def test_the_benchmark_measures_less_padding_when_grouped() -> None:
    # scripts/bench_grouped_batching.py on 600 COCO-like sizes, one epoch of 8 GPUs x 2
    spec = importlib.util.spec_from_file_location("bench_grouped", ROOT / "scripts" / "bench_grouped_batching.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sizes = bench.coco_like_sizes(600, seed=0)
    plain, grouped = (bench.measure(sizes, g, 2, 8, (800, 800), 1333, 32, epochs=1, seed=0) for g in (False, True))
    assert plain["mixed_batches"] > 0.3 and grouped["mixed_batches"] <= 8 / grouped["batches"]  # one step at most
    assert grouped["padded_fraction"] < plain["padded_fraction"] / 2
