"""Fault tolerance: atomic and safe checkpoints, non-finite losses, bad samples, early errors.
(Exact resume after SIGKILL / SIGTERM is in test_resume.py.)"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_utils import TINY_MODEL, compose_cfg, metrics_csv, run_cfg, tiny_overrides
from hydra.errors import InstantiationException
from lightning.pytorch import Callback
from omegaconf import OmegaConf

import knet_lightning.cli as cli
from knet_lightning.checkpoint.io import CheckpointError, SafeCheckpointIO, atomic_torch_save, load_checkpoint_file
from knet_lightning.data.meta import DatasetError
from knet_lightning.data.sampling import ResumableSampler, SeededSamples
from knet_lightning.data.synthetic import generate_synthetic_panoptic
from knet_lightning.errors import NonFiniteLossError

# the synthetic set that tiny_overrides() describes, so a test can alter it before a run
TINY_GEN = {"num_train": 8, "num_val": 4, "image_size": 64, "seed": 0, "max_objects": 4}


def _with_callbacks(monkeypatch: pytest.MonkeyPatch, *extra: Callback) -> None:
    original = cli.build_callbacks
    monkeypatch.setattr(cli, "build_callbacks", lambda cfg: original(cfg) + list(extra))


# --------------------------------------------------------------------------- checkpoints


def test_an_interrupted_write_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def dying_save(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands for a kill in the middle of the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint_file(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left

    # a writer killed with SIGKILL leaves its temporary file; the next save removes it
    (tmp_path / ".last.ckpt.99999.tmp").write_bytes(b"partial")
    atomic_torch_save({"step": 3}, path)
    assert load_checkpoint_file(path) == {"step": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos"),
    ],
    ids=["enospc", "torch-writer-on-a-full-disk"],
)
def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    import shutil
    from collections import namedtuple

    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def full_disk_save(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 a few bytes")
        raise failure

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(
        OSError, match=rf"^\[Errno 28\] No space left on device: writing checkpoint {path} failed \(1 MB free"
    ) as err:
        atomic_torch_save({"step": 2}, path)
    assert err.value.errno == 28
    monkeypatch.undo()
    assert load_checkpoint_file(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_run_failed_line_of_a_full_disk_says_where(tmp_path: Path) -> None:
    from knet_lightning.errors import summary

    try:
        try:
            raise OSError(28, "No space left on device")  # a write() names no file
        except OSError as inner:
            raise RuntimeError("logging failed") from inner
    except RuntimeError as err:
        line = summary(err, str(tmp_path))
    assert line.startswith(f"RuntimeError: No space left on device while writing under {tmp_path} (")
    assert "MB free there): logging failed" in line


def test_unsafe_objects_need_trusted_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {}, "extra": Path("x")}, path)  # a pickled class, not plain data
    with pytest.raises(CheckpointError, match=r"odd.ckpt holds objects that safe loading .* trusted_checkpoint=true"):
        load_checkpoint_file(path)
    assert load_checkpoint_file(path, trusted=True)["extra"] == Path("x")
    assert SafeCheckpointIO(trusted=True).load_checkpoint(path)["extra"] == Path("x")
    with pytest.raises(CheckpointError, match="odd.ckpt"):
        SafeCheckpointIO().load_checkpoint(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with checkpoints/last.ckpt after one training step."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(
        tmp,
        tiny_overrides(
            "trainer.max_steps=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=0",
            "test_after_fit=false",
            "callbacks.step_checkpoint.every_n_train_steps=1",
        ),
    )
    run_cfg(cfg)
    return tmp


def test_our_checkpoints_load_with_weights_only(trained: Path) -> None:
    state = load_checkpoint_file(trained / "run" / "checkpoints" / "last.ckpt")  # weights_only=True
    assert state["global_step"] == 1
    assert "RNGStateCheckpoint" in str(list(state["callbacks"]))
    assert state["SyntheticPanopticDataModule"]["train_sampler"]["consumed"] == 4  # 1 batch of 4
    # the step checkpoint and the epoch-end one share last.ckpt: no "last-v1.ckpt"
    assert not list((trained / "run" / "checkpoints").glob("last-v*.ckpt"))


def _eval_cfg(tmp_path: Path, trained: Path, *overrides: str, drop: tuple[str, ...] = ()) -> Any:
    ckpt = trained / "run" / "checkpoints" / "last.ckpt"
    given = [o for o in tiny_overrides("mode=eval", f"ckpt_path={ckpt}", *overrides) if o.split("=")[0] not in drop]
    cfg = compose_cfg(tmp_path, given)
    OmegaConf.update(cfg, "paths.data_dir", str(trained / "data"))
    return cfg


def test_eval_rebuilds_the_network_the_checkpoint_was_trained_with(
    tmp_path: Path, trained: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the training run's model overrides (the config's defaults differ), eval builds the
    checkpoint's network and says so; a free key (post-processing) still applies."""
    stored = load_checkpoint_file(trained / "run" / "checkpoints" / "last.ckpt")["knet_model_config"]
    assert stored["num_proposals"] == 6 and stored["net"]["channels"] == 32
    cfg = _eval_cfg(tmp_path, trained, "model.postprocess.object_mask_thr=0.5",
                    drop=("model.num_proposals", "model.net.channels", "model.net.num_groups"))  # fmt: skip
    assert cfg.model.num_proposals != 6 and cfg.model.net.channels != 32
    built: list[Any] = []
    original = cli.build_model
    with caplog.at_level(logging.INFO, logger="knet_lightning.checkpoint.model"):
        try:
            cli.build_model = lambda *a: built.append(original(*a)) or built[-1]
            run_cfg(cfg)
        finally:
            cli.build_model = original
    module = built[0]
    assert module.num_proposals == 6
    assert module.net.kernel_head.init_kernels.weight.shape[:2] == (6, 32)  # (N, channels): the checkpoint's
    assert module.task.settings.object_mask_thr == 0.5
    assert "model.num_proposals=6 (the config says" in caplog.text
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("override", "keys"),
    [("model.num_proposals=8", ["model.num_proposals"]), ("model.net.channels=16", ["model.net.channels"])],
)
def test_eval_with_a_model_override_the_checkpoint_contradicts_names_the_keys(
    tmp_path: Path, trained: Path, override: str, keys: list[str]
) -> None:
    cfg = _eval_cfg(tmp_path, trained, override)
    with pytest.raises(ValueError) as err:
        run_cfg(cfg)
    message = str(err.value)
    assert "\n" not in message and "the checkpoint's network differs in" in message
    for key in keys:
        assert f"{key} (checkpoint" in message


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_truncated_checkpoint_gives_an_error_naming_it(tmp_path: Path, trained: Path, mode: str) -> None:
    good = trained / "run" / "checkpoints" / "last.ckpt"
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cfg = compose_cfg(tmp_path, tiny_overrides(f"mode={mode}", f"ckpt_path={bad}", "test_after_fit=false"))
    OmegaConf.update(cfg, "paths.data_dir", str(trained / "data"))
    with pytest.raises(CheckpointError, match=r"checkpoint .*cut.ckpt \(\d+ bytes\) is truncated or corrupt"):
        run_cfg(cfg)


def _flip_a_bit_in_the_largest_tensor(src: Path, dst: Path) -> None:
    """A copy of a torch zip checkpoint with one bit changed in the middle of its largest tensor
    record: the zip and the pickle stay intact, so only a checksum can tell."""
    import zipfile

    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # local header: 30 bytes + name + extra field, then the stored (uncompressed) record
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_flipped_bit_in_tensor_data_is_refused_naming_the_file(tmp_path: Path, trained: Path, mode: str) -> None:
    good = trained / "run" / "checkpoints" / "last.ckpt"
    bad = tmp_path / "flipped.ckpt"
    _flip_a_bit_in_the_largest_tensor(good, bad)
    torch.load(bad, map_location="cpu", weights_only=True)  # torch itself does not notice
    load_checkpoint_file(good)  # the intact file passes its check
    cfg = compose_cfg(tmp_path, tiny_overrides(f"mode={mode}", f"ckpt_path={bad}", "test_after_fit=false"))
    OmegaConf.update(cfg, "paths.data_dir", str(trained / "data"))
    with pytest.raises(CheckpointError, match=r"checkpoint .*flipped.ckpt \(\d+ bytes\) is corrupt: .*checksum"):
        run_cfg(cfg)


def test_files_without_a_checksum_still_load(tmp_path: Path) -> None:
    path = tmp_path / "published.pth"
    torch.save({"state_dict": {"w": torch.ones(3)}}, path)  # written elsewhere: no digest
    assert torch.equal(load_checkpoint_file(path)["state_dict"]["w"], torch.ones(3))


# --------------------------------------------------------------------------- non-finite losses


class InjectNaN(Callback):
    """Makes the loss NaN on the given training steps and records parameters around them."""

    def __init__(self, bad_steps: set[int] | None = None) -> None:
        self.bad_steps = bad_steps  # None: every step
        self.calls = 0
        self.params_before: dict[int, list[torch.Tensor]] = {}
        self.params_after: dict[int, list[torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        criterion = pl_module.criterion
        owner = self

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = criterion

            def forward(self, outputs, targets):  # noqa: ANN001
                losses = self.inner(outputs, targets)
                owner.calls += 1
                if owner.bad_steps is None or owner.calls in owner.bad_steps:
                    key = next(iter(losses))
                    losses[key] = losses[key] * float("nan")
                return losses

        pl_module.criterion = Wrapped()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.params_before[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.params_after[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]


def test_a_nan_loss_skips_its_step_and_logs_the_images(tmp_path: Path, monkeypatch, caplog) -> None:
    probe = InjectNaN({2})
    _with_callbacks(monkeypatch, probe)
    cfg = compose_cfg(
        tmp_path,
        tiny_overrides(
            "data.batch_size=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=0", "test_after_fit=false"
        ),
    )
    with caplog.at_level(logging.WARNING):
        run_cfg(cfg)
    same = [torch.equal(a, b) for a, b in zip(probe.params_before[1], probe.params_after[1])]
    assert all(same), "the NaN step changed the weights"
    moved = [torch.equal(a, b) for a, b in zip(probe.params_before[2], probe.params_after[2])]
    assert not all(moved), "the step after the NaN one did not train"
    messages = [r.getMessage() for r in caplog.records if "non-finite training loss" in r.getMessage()]
    assert len(messages) == 1
    assert "images [" in messages[0] and ".jpg" in messages[0] and "step is skipped" in messages[0]


def test_a_stream_of_nan_losses_stops_the_run(tmp_path: Path, monkeypatch) -> None:
    _with_callbacks(monkeypatch, InjectNaN(None))
    cfg = compose_cfg(
        tmp_path,
        tiny_overrides(
            "data.batch_size=1",
            "max_bad_steps=2",
            "trainer.limit_train_batches=5",
            "trainer.limit_val_batches=0",
            "test_after_fit=false",
        ),
    )
    with pytest.raises(
        NonFiniteLossError, match=r"3 consecutive training steps had a NaN/Inf loss \(max_bad_steps=2\)"
    ):
        run_cfg(cfg)


# --------------------------------------------------------------------------- bad samples


def _corrupt_first_training_image(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)  # as the CLI makes paths.data_dir
    root = generate_synthetic_panoptic(data_dir / "synthetic", **TINY_GEN)
    victim = sorted((root / "train2017").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    return victim


def test_on_bad_sample_skip_finishes_the_epoch_and_reports(tmp_path: Path, caplog) -> None:
    victim = _corrupt_first_training_image(tmp_path / "data")
    cfg = compose_cfg(
        tmp_path, tiny_overrides("data.on_bad_sample=skip", "trainer.limit_val_batches=0", "test_after_fit=false")
    )
    with caplog.at_level(logging.WARNING):
        run_cfg(cfg)
    report = [r.getMessage() for r in caplog.records if "bad training sample(s)" in r.getMessage()]
    assert len(report) == 1 and "skipped 1 bad training sample(s)" in report[0] and victim.name in report[0]
    rows = metrics_csv(tmp_path / "run")
    assert [float(r["train/skipped_samples"]) for r in rows if r.get("train/skipped_samples")] == [1.0]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.parametrize("workers", [0, 1])
def test_on_bad_sample_error_names_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: int) -> None:
    """In the main process or in a loader worker, the run's last line before the traceback is the
    one-line DatasetError naming the file (not "Caught DatasetError in DataLoader worker")."""
    victim = _corrupt_first_training_image(tmp_path / "data")
    cfg = compose_cfg(tmp_path, tiny_overrides("trainer.limit_val_batches=0", "test_after_fit=false",
                                               f"data.num_workers={workers}"))  # fmt: skip
    with pytest.raises(DatasetError, match=victim.name), caplog.at_level(logging.ERROR):
        run_cfg(cfg)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run failed:")]
    assert line.startswith(f"run failed: DatasetError: {victim}: cannot decode image file") and "\n" not in line


def test_on_bad_sample_rejects_an_unknown_policy(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, tiny_overrides("data.on_bad_sample=ignore"))
    # Hydra wraps the data module's ValueError in its InstantiationException
    with pytest.raises(
        (ValueError, InstantiationException),
        match=r"data.on_bad_sample must be one of \('error', 'skip'\), got 'ignore'",
    ):
        run_cfg(cfg)


# --------------------------------------------------------------------------- data order


def test_sampler_resumes_mid_epoch_and_reshards(tmp_path: Path) -> None:
    data = list(range(10))
    full = [list(ResumableSampler(data, batch_size=2, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    for r in (0, 1):
        s = ResumableSampler(data, batch_size=2, seed=3, num_replicas=2, rank=r)
        s.load_state_dict({"epoch": 0, "consumed": 4, "dataset_size": 10, "seed": 3, "shuffle": True})
        assert list(s) == full[r][2:]  # 1 batch of 2 on each of 2 ranks = 4 positions consumed
    # a checkpoint written before the resumed iteration starts keeps the position
    fresh = ResumableSampler(data, batch_size=2, seed=3, num_replicas=2, rank=0)
    fresh.load_state_dict({"epoch": 0, "consumed": 4, "dataset_size": 10, "seed": 3, "shuffle": True})
    assert fresh.state_dict()["consumed"] == 4 and fresh.consumed_batches == 1
    # the same position onto one process: the 6 positions nobody has seen yet
    one = ResumableSampler(data, batch_size=2, seed=3)
    one.load_state_dict({"epoch": 0, "consumed": 4, "dataset_size": 10, "seed": 3, "shuffle": True})
    assert sorted(list(one)) == sorted(full[0][2:] + full[1][2:])
    # an epoch-end state starts the next epoch from its beginning
    nxt = ResumableSampler(data, batch_size=2, seed=3)
    nxt.load_state_dict(
        {"epoch": 0, "consumed": 10, "epoch_done": True, "dataset_size": 10, "seed": 3, "shuffle": True}
    )
    assert nxt.epoch == 1 and len(list(nxt)) == 10


def test_augmentations_depend_on_seed_epoch_and_index_only() -> None:
    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
            return torch.rand(3), {}

    ds = SeededSamples(Noisy(), seed=7)
    a = ds[(1, 2)][0]
    torch.rand(100)  # global RNG state must not matter ...
    assert torch.equal(ds[(1, 2)][0], a)
    state = torch.get_rng_state()
    ds[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be changed
    assert not torch.equal(ds[(2, 2)][0], a) and not torch.equal(ds[(1, 3)][0], a)


# --------------------------------------------------------------------------- early errors


class _StopBeforeTrainer(Exception):
    pass


def _stop_before_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(cfg: Any) -> list:
        raise _StopBeforeTrainer

    monkeypatch.setattr(cli, "build_callbacks", stop)


def test_missing_data_root_fails_before_the_trainer(tmp_path: Path, monkeypatch) -> None:
    _stop_before_trainer(monkeypatch)
    cfg = compose_cfg(tmp_path, [*TINY_MODEL, "data=coco_panoptic", f"data.root={tmp_path}/nowhere"])
    with pytest.raises(DatasetError, match=r"COCO panoptic root .*nowhere does not exist"):
        run_cfg(cfg)


def test_wrong_data_layout_fails_before_the_trainer(tmp_path: Path, monkeypatch) -> None:
    _stop_before_trainer(monkeypatch)
    root = generate_synthetic_panoptic(tmp_path / "shapes", **TINY_GEN)
    cfg = compose_cfg(
        tmp_path,
        [
            *TINY_MODEL,
            "data=coco_panoptic",
            f"data.root={root}",
            "data.layout=root",
            "data.num_things=4",
            "data.num_stuff=3",
            "data.num_classes=7",
        ],
    )
    with pytest.raises(DatasetError, match=r"missing PNG folder .* did you mean layout='annotations'"):
        run_cfg(cfg)


def test_missing_training_split_fails_before_the_trainer(tmp_path: Path, monkeypatch) -> None:
    # the validation split (read for the classes) is fine; the training split's JSON is gone
    _stop_before_trainer(monkeypatch)
    root = generate_synthetic_panoptic(tmp_path / "shapes", **TINY_GEN)
    (root / "annotations" / "panoptic_train2017.json").unlink()
    cfg = compose_cfg(
        tmp_path,
        [
            *TINY_MODEL,
            "data=coco_panoptic",
            f"data.root={root}",
            "data.num_things=4",
            "data.num_stuff=3",
            "data.num_classes=7",
        ],
    )
    with pytest.raises(DatasetError, match=r"missing panoptic JSON .*panoptic_train2017.json"):
        run_cfg(cfg)


def test_too_few_proposals_warns_with_the_number(tmp_path: Path, monkeypatch, caplog) -> None:
    _stop_before_trainer(monkeypatch)
    (tmp_path / "data").mkdir()  # as the CLI makes paths.data_dir
    root = generate_synthetic_panoptic(tmp_path / "data" / "synthetic", **TINY_GEN)
    from knet_lightning.data.coco import COCOPanopticDataset

    most = COCOPanopticDataset(root, split="train").max_things_per_image()
    assert 2 <= most <= TINY_GEN["max_objects"]
    cfg = compose_cfg(tmp_path, tiny_overrides(f"model.num_proposals={most - 1}"))
    with caplog.at_level(logging.WARNING), pytest.raises(_StopBeforeTrainer):
        run_cfg(cfg)
    warnings = [r.getMessage() for r in caplog.records if "num_proposals" in r.getMessage()]
    assert warnings == [
        f"model.num_proposals={most - 1} is below the largest number of thing segments in one training image "
        f"({most}): some instances of such images can never be matched to a kernel; consider "
        f"model.num_proposals>={most}"
    ]
    caplog.clear()
    cfg = compose_cfg(tmp_path, tiny_overrides(f"model.num_proposals={most}"))
    with caplog.at_level(logging.WARNING), pytest.raises(_StopBeforeTrainer):
        run_cfg(cfg)
    assert not [r for r in caplog.records if "num_proposals" in r.getMessage()]
