"""Two "nodes" of one process each on this machine, over loopback, as one training job:
``trainer=multinode`` launched by hand (Lightning's environment: MASTER_ADDR / MASTER_PORT /
NODE_RANK) and under torchrun (torch elastic's environment)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from distributed_utils import CLI_TINY, cli_env, free_port, probe_overrides, read_probes, start_cli, wait_cli

# trainer=multinode is the GPU config; on this machine each node is one CPU process over gloo
CPU_NODES = [
    "trainer=multinode",
    "trainer.num_nodes=2",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.strategy.process_group_backend=gloo",
    "trainer.precision=32-true",
    "trainer.sync_batchnorm=false",
    "trainer.benchmark=false",
]


def _check_one_job(tmp_path: Path, run_dir: Path) -> None:
    probes = read_probes(tmp_path / "probe")
    assert sorted(probes) == [0, 1]
    for rank, probe in probes.items():
        assert probe["world_size"] == 2 and probe["num_nodes"] == 2 and probe["global_rank"] == rank
    # the same steps and the same weights: gradients were averaged across the two nodes
    assert probes[0]["global_step"] == probes[1]["global_step"] == 2
    assert probes[0]["final_weights"] == probes[1]["final_weights"]
    # the validation split was shared out, not evaluated twice
    seen = probes[0]["val_images"] + probes[1]["val_images"]
    assert len(seen) == len(set(seen)) == 5
    # one run folder with one set of checkpoints and results, written by global rank 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "val/pq" in metrics and "test/pq" in metrics
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow  # the torchrun launch below covers the two-node job in CI
def test_two_nodes_over_loopback_train_as_one_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    port = str(free_port())
    args = [*CPU_NODES, *CLI_TINY, f"hydra.run.dir={run_dir}", *probe_overrides(tmp_path / "probe")]
    procs = [
        start_cli(
            args,
            tmp_path / f"node{rank}",
            cli_env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank)),
        )
        for rank in (0, 1)
    ]
    for proc in procs:
        wait_cli(proc)
    _check_one_job(tmp_path, run_dir)


def test_two_nodes_under_torchrun_train_as_one_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    port = str(free_port())
    args = [*CPU_NODES, *CLI_TINY, f"hydra.run.dir={run_dir}", *probe_overrides(tmp_path / "probe")]
    procs = [
        start_cli(
            args,
            tmp_path / f"node{rank}",
            cli_env(tmp_path),
            prefix=[
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "knet_lightning",
            ],
        )
        for rank in (0, 1)
    ]
    for proc in procs:
        wait_cli(proc)
    _check_one_job(tmp_path, run_dir)
