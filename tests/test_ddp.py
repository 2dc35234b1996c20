"""DDP on the CPU (``trainer=ddp_cpu``: 2 processes, gloo) through the real CLI, and the pieces
that make it right: one run folder, rank-zero writes, evaluation without repeated images."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_utils import compose_cfg, run_cfg
from distributed_utils import CLI_TINY, probe_overrides, read_probes, run_cli
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import OmegaConf

from knet_lightning.data.synthetic import SyntheticPanopticDataModule
from knet_lightning.runtime import distributed
from knet_lightning.runtime.distributed import child_command, end_of_job, eval_sampler, is_global_zero_from_env


def _same_metrics(a: dict[str, float], b: dict[str, float], prefix: str) -> None:
    keys = sorted(k for k in a if k.startswith(prefix))
    assert keys and keys == sorted(k for k in b if k.startswith(prefix))
    for k in keys:
        if math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], abs=1e-6), k


def test_ddp_cpu_trains_and_evaluates_like_one_process(tmp_path: Path) -> None:
    # 1. train with 2 processes: one run folder, one checkpoint, ranks in step
    run_dir = tmp_path / "ddp"
    out = run_cli(
        ["trainer=ddp_cpu", *CLI_TINY, f"hydra.run.dir={run_dir}", *probe_overrides(tmp_path / "probe_fit")], tmp_path
    )
    # the epoch metrics are global (torchmetrics sync them) and logged as such: no Lightning advice
    assert "sync_dist=True" not in out
    assert (run_dir / "config_resolved.yaml").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    assert list((run_dir / "overlays").rglob("*.png"))
    # each process keeps its own log file in the shared run folder
    assert (run_dir / "train.log").is_file() and (run_dir / "train.node0.local1.log").is_file()
    # rank 1 ran in the same folder: no second run folder anywhere
    assert not (tmp_path / "logs").exists(), list((tmp_path / "logs").rglob("*"))
    fit_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val/pq", "val/pq_s1", "test/pq", "test/miou", "model/params_m", "model/gflops", "train/throughput"} <= set(
        fit_metrics
    )

    probes = read_probes(tmp_path / "probe_fit")
    assert sorted(probes) == [0, 1]
    assert all(p["world_size"] == 2 for p in probes.values())
    assert probes[0]["final_weights"] == probes[1]["final_weights"]
    # every validation / test image seen exactly once over the two ranks (5 images: 3 + 2)
    for split in ("val_images", "test_images"):
        seen = probes[0][split] + probes[1][split]
        assert len(seen) == len(set(seen)) == 5, split

    # 2. evaluate the checkpoint over 2 processes and over 1: the same numbers
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    eval2 = tmp_path / "eval2"
    run_cli(
        ["--config-name", "eval", "trainer=ddp_cpu", *CLI_TINY, f"ckpt_path={ckpt}", f"hydra.run.dir={eval2}"], tmp_path
    )
    two = json.loads((eval2 / "metrics.json").read_text())

    cfg = compose_cfg(tmp_path, [*CLI_TINY, f"ckpt_path={ckpt}"], config_name="eval")
    run_cfg(cfg)
    one = json.loads((tmp_path / "run" / "metrics.json").read_text())

    # the thresholds at 0 make the untrained model predict segments: non-trivial numbers
    assert one["test/acc"] > 0 and one["test/miou"] > 0
    _same_metrics(one, two, "test/")
    # test after fit evaluated the best checkpoint (= the last one after 1 epoch) on 2 processes
    _same_metrics(one, fit_metrics, "test/")


def test_eval_sampler_splits_without_repeats(tmp_path: Path) -> None:
    dataset = list(range(5))
    assert eval_sampler(dataset, None) is None
    assert eval_sampler(dataset, SimpleNamespace(distributed_sampler_kwargs=None)) is None
    shares = [
        list(eval_sampler(dataset, SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": r})))
        for r in (0, 1)
    ]
    assert sorted(shares[0] + shares[1]) == dataset and len(shares[0]) == 3 and len(shares[1]) == 2
    with pytest.raises(ValueError, match="evaluation split has 1 images for 2 processes"):
        eval_sampler([0], SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0}))


def test_datamodule_eval_loaders_do_not_repeat_images_under_ddp(tmp_path: Path) -> None:
    dm = SyntheticPanopticDataModule(
        tmp_path / "synthetic", num_train=4, num_val=5, image_size=64, batch_size=2, val_batch_size=2
    )
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    names = [t["file_name"] for batch in dm.val_dataloader() for t in batch["targets"]]
    assert len(names) == 2  # rank 1's share of 5: images 1 and 3
    # a DistributedSampler subclass, so Lightning does not replace it with its padding one
    assert isinstance(dm.val_dataloader().sampler, UnrepeatedDistributedSampler)
    assert isinstance(dm.test_dataloader().sampler, UnrepeatedDistributedSampler)


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
        ({"LOCAL_RANK": "1"}, False),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
        ({"RANK": "3"}, False),
        ({"SLURM_PROCID": "2"}, False),
    ],
)
def test_global_zero_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: bool) -> None:
    for key in distributed.RANK_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_global_zero_from_env() is expected


def test_child_command_runs_this_job_in_its_folder(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, ["model.num_stages=2", "trainer=ddp_cpu"])
    OmegaConf.update(cfg, "hydra.runtime.output_dir", str(tmp_path / "multirun dir" / "3"))
    HydraConfig.instance().set_config(cfg)
    command, cwd = child_command(1)
    assert command[1:3] == ["-m", "knet_lightning"]
    assert "-m" not in command[3:] and "--multirun" not in command
    assert "model.num_stages=2" in command and "trainer=ddp_cpu" in command
    assert f"hydra.run.dir='{tmp_path / 'multirun dir' / '3'}'" in command
    assert "hydra.mode=RUN" in command and "hydra.output_subdir=null" in command
    assert cwd == str(tmp_path)


def test_end_of_job_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    distributed._remember_env()
    os.environ["MASTER_PORT"] = "5555"
    os.environ["LOCAL_RANK"] = "0"
    end_of_job()
    assert os.environ["MASTER_PORT"] == "1234"
    assert "LOCAL_RANK" not in os.environ


def _reduce_mean_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from knet_lightning.criterion.criterion import _reduce_mean

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # the focal / cls loss normaliser: rank 0 has 3 positives, rank 1 has 6
        value = _reduce_mean(torch.tensor(3.0 * (rank + 1)))
        Path(out, f"{rank}.txt").write_text(str(float(value)))
    finally:
        dist.destroy_process_group()


def test_loss_normaliser_is_averaged_across_processes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp
    from distributed_utils import free_port

    mp.spawn(_reduce_mean_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [float((tmp_path / f"{r}.txt").read_text()) for r in (0, 1)] == [4.5, 4.5]


def test_each_process_logs_to_its_own_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from knet_lightning.runtime.distributed import RANK_ENV_KEYS, log_file_suffix

    for key in RANK_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert log_file_suffix() == ""
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert log_file_suffix() == ".node0.local1"
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert log_file_suffix() == ".node1.local0"
    monkeypatch.setenv("RANK", "3")
    assert log_file_suffix() == ".rank3"
