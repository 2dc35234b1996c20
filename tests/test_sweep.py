"""Sweeps over N (model.num_proposals) and S (model.num_stages) through the real CLI with ``-m``:
the basic sweeper's grid (also with DDP), the Optuna variant, the summary table, W&B grouping."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from cli_utils import TINY_DATA, TINY_MODEL, compose_cfg, run_cfg, tiny_overrides
from distributed_utils import probe_overrides, read_probes, run_cli
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from wandb_utils import _records, read_offline_run

from knet_lightning.runtime.sweep import sweep_group, sweep_tags, write_summary

# the tiny model and data without N and S (the sweep sets them), two steps, one validation
# batch, no test pass and no progress bars: a job takes a few seconds
SWEEP_TINY = (
    [o for o in TINY_MODEL if not o.startswith(("model.num_proposals=", "model.num_stages="))]
    + TINY_DATA
    + [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
        "test_after_fit=false",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]
)


def _summary(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_grid_sweep_2x2_writes_the_summary_and_groups_its_wandb_runs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    run_cli(
        [
            "-m",
            "model.num_proposals=4,6",
            "model.num_stages=1,2",
            *SWEEP_TINY,
            "logger=wandb",
            "logger.wandb.offline=true",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
        WANDB_API_KEY="k" * 40,
    )

    rows = _summary(sweep_dir)
    assert sorted((int(r["N"]), int(r["S"])) for r in rows) == [(4, 1), (4, 2), (6, 1), (6, 2)]
    for row in rows:
        assert row["status"] == "done" and row["task"] == "panoptic"
        assert float(row["params_m"]) > 1 and float(row["gflops"]) > 0 and float(row["throughput"]) > 0
        assert row["val/pq"] != "" and row["val/pq_s1"] != ""
        # every stage depth is evaluated: S=2 jobs also have PQ after stage 2
        assert (row["val/pq_s2"] != "") == (row["S"] == "2")
    markdown = (sweep_dir / "summary.md").read_text().splitlines()
    assert markdown[0].startswith("| job | N | S |") and len(markdown) == 2 + 4

    # W&B: one group (the multirun folder's name), tags N/S, the config and the metrics
    runs = sorted(sweep_dir.glob("*/wandb/offline-run-*"))
    assert len(runs) == 4
    for run_path in runs:
        run = read_offline_run(run_path)
        config = run["config"]
        n, s = config["model"]["num_proposals"], config["model"]["num_stages"]
        assert run["group"] == "multirun"
        assert {f"N{n}", f"S{s}"} <= set(run["tags"])
        assert {"model", "data", "trainer", "optimized_metric", "seed"} <= set(config)
        assert config["logger"]["wandb"]["group"] == "multirun"
        keys = set().union(*(row.keys() for row in run["history"]))
        expected = {
            "train/loss",
            "train/s1.cls",
            "val/pq",
            "val/pq_s1",
            "model/params_m",
            "model/gflops",
            "train/throughput",
        }
        assert expected <= keys, expected - keys
        if s == 2:
            assert {"train/s2.cls", "val/pq_s2"} <= keys
        assert any(k.startswith("val/overlays") for k in keys)
    dumps = [p.read_text() for p in sweep_dir.rglob("*.yaml")] + [p.read_text() for p in sweep_dir.rglob("*.log")]
    assert not any("k" * 40 in text for text in dumps)


# slow (make test-all): the Optuna variant of the sweep the README test and the grid test run in CI
@pytest.mark.slow
def test_optuna_sweep_runs_two_trials_and_returns_the_metric(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    run_cli(
        [
            "hparams_search=kernels_stages_optuna",
            "hydra.sweeper.n_trials=2",
            # a search space the tiny model can afford (the config's is 50..200 kernels)
            "model.num_proposals=choice(4,6)",
            "model.num_stages=choice(1,2)",
            *SWEEP_TINY,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
    )
    rows = _summary(sweep_dir)
    assert len(rows) == 2
    assert all(int(r["N"]) in (4, 6) and int(r["S"]) in (1, 2) for r in rows)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    values = [float(r["val/pq"]) for r in rows]
    assert results["best_value"] == pytest.approx(max(values))
    assert set(results["best_params"]) == {"model.num_proposals", "model.num_stages"}


@pytest.mark.slow  # DDP x sweep (48 s); each alone runs in CI: test_ddp.py, test_readme.py, the tests above
def test_grid_sweep_with_ddp_cpu_runs_each_job_in_its_own_folder(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    run_cli(
        [
            "-m",
            "model.num_proposals=4",
            "model.num_stages=1,2",
            "trainer=ddp_cpu",
            *SWEEP_TINY,
            f"hydra.sweep.dir={sweep_dir}",
            *probe_overrides(tmp_path / "probe_${model.num_stages}"),
        ],
        tmp_path,
    )
    rows = _summary(sweep_dir)
    assert [(r["N"], r["S"], r["status"]) for r in rows] == [("4", "1", "done"), ("4", "2", "done")]
    for job, stages in ((0, 1), (1, 2)):
        job_dir = sweep_dir / str(job)
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert OmegaConf.load(job_dir / "config_resolved.yaml").model.num_stages == stages
        probes = read_probes(tmp_path / f"probe_{stages}")
        # both ranks of each job ran that job's settings, as one 2-process job
        assert sorted(probes) == [0, 1] and all(p["world_size"] == 2 for p in probes.values())
        assert probes[0]["final_weights"] == probes[1]["final_weights"]
    # the ranks ran in the jobs' folders, not in run folders of their own or sweeps of their own
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "logs").exists()


def test_summary_marks_unfinished_jobs_and_keeps_finished_ones(tmp_path: Path) -> None:
    for job, (n, s) in enumerate(((10, 1), (10, 2))):
        (tmp_path / str(job)).mkdir()
        OmegaConf.save(
            {"model": {"num_proposals": n, "num_stages": s, "task": "panoptic"}},
            tmp_path / str(job) / "config_resolved.yaml",
        )
    (tmp_path / "0" / "metrics.json").write_text(
        json.dumps(
            {
                "val/pq": 12.5,
                "val/pq_s1": 12.5,
                "model/params_m": 3.0,
                "model/gflops": 1.5,
                "train/throughput": 9.0,
                "train/loss": 1.0,
                "lr-AdamW/head": 1e-4,
            }
        )
    )
    write_summary(tmp_path)
    rows = _summary(tmp_path)
    assert [(r["job"], r["N"], r["S"], r["status"]) for r in rows] == [
        ("0", "10", "1", "done"),
        ("1", "10", "2", "incomplete"),
    ]
    assert rows[0]["val/pq"] == "12.5" and rows[0]["gflops"] == "1.5" and rows[1]["val/pq"] == ""
    assert "train/loss" not in rows[0] and "lr-AdamW/head" not in rows[0]
    assert "| 0 | 10 | 1 | panoptic | 3.00 | 1.500 | 9.00 | done | 12.50 |" in (tmp_path / "summary.md").read_text()


def test_group_and_tags_only_inside_a_multirun(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, [])
    try:
        HydraConfig.instance().set_config(cfg)
        assert sweep_group() == "" and sweep_tags(["a"], 10, 2) == ["a"]
        cfg = compose_cfg(tmp_path, [])  # set_config made the first one read-only
        OmegaConf.update(cfg, "hydra.mode", "MULTIRUN")
        OmegaConf.update(cfg, "hydra.sweep.dir", str(tmp_path / "multiruns" / "2026-01-01_00-00-00"))
        HydraConfig.instance().set_config(cfg)
        assert sweep_group() == "2026-01-01_00-00-00"
        assert sweep_tags(["a"], 10, 2) == ["a", "N10", "S2"]
    finally:
        HydraConfig.instance().cfg = None  # later tests must not run "inside" this multirun


def test_wandb_resumes_by_id_and_logs_the_checkpoint_as_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # offline through WANDB_MODE, not logger.wandb.offline: Lightning refuses log_model with
    # offline=True, while wandb itself records the artifact offline and uploads it on `wandb sync`
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(
        tmp_path,
        tiny_overrides(
            "debug=limit",
            "test_after_fit=false",
            "logger=wandb",
            "logger.wandb.id=knetresume1",
            "logger.wandb.resume=allow",
            "logger.wandb.log_model=true",
        ),
    )
    run_cfg(cfg)
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()
    (run_path,) = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert run_path.name.endswith("-knetresume1")
    kinds, run_ids = [], []
    for raw in _records(next(run_path.glob("*.wandb"))):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        kinds.append(rec.WhichOneof("record_type"))
        if kinds[-1] == "run":
            run_ids.append(rec.run.run_id)
        if kinds[-1] == "artifact":
            assert rec.artifact.type == "model"
            paths = [entry.path for entry in rec.artifact.manifest.contents]
            assert any(p.endswith(".ckpt") for p in paths)
    assert run_ids == ["knetresume1"]
    assert "artifact" in kinds
    assert read_offline_run(run_path)["history"]
