"""SLURM without a cluster: the launcher's sbatch script, the ranks Lightning's SLURMEnvironment
reads from a simulated job, the requeue on SIGUSR1 (a stand-in ``scontrol``) and the requeued
job's resume, a 2 x 2 sweep through submitit's local executor, and exact resume under DDP after a kill
and after a SIGTERM (``trainer=ddp_cpu``)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytest
from cli_utils import assert_same_run, compose_cfg
from distributed_utils import CLI_TINY, cli_env, free_port, probe_overrides, read_probes, run_cli, start_cli, wait_cli
from omegaconf import OmegaConf
from slurm_utils import fake_scontrol, slurm_env, start_steps

from knet_lightning.runtime.slurm import auto_resume_path, check_requeue_signal, slurm_environment

# trainer=slurm is the GPU config; here every task is one CPU process over gloo
CPU_SLURM = [
    "trainer=slurm",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.sync_batchnorm=false",
    "trainer.benchmark=false",
    "trainer.strategy.process_group_backend=gloo",
]
SLURM_KEYS = (
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_NNODES",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _simulate(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """This process as one SLURM task: ``env`` set, every other SLURM / rendezvous variable unset
    (set first, so that monkeypatch restores what Lightning writes, e.g. MASTER_ADDR)."""
    for key in SLURM_KEYS:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# ---------------------------------------------------------------------- configs


def test_submitit_slurm_launcher_writes_the_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit

    # submitit's SLURM executor refuses to start where there is no srun
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    cfg = compose_cfg(
        tmp_path,
        [
            "hydra/launcher=submitit_slurm",
            "trainer=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=proj42",
            "hydra.launcher.nodes=2",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.timeout_min=600",
            "hydra.launcher.mem_gb=256",
        ],
    )
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.setup(hydra_context=None, task_function=None, config=cfg)

    scripts: list[str] = []

    class Submitted(Exception):
        pass

    def capture(self: Any, fn: Any, *iterables: Any) -> None:
        scripts.append(self._executor._make_submission_file_text("python -m submitit.core._submit x", "uid"))
        self._executor.parameters["map_count"] = len(iterables[0])
        scripts.append(self._executor._make_submission_file_text("python -m submitit.core._submit x", "uid"))
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(Submitted):
        launcher.launch([["model.num_stages=1"], ["model.num_stages=2"]], initial_job_idx=0)
    single, array = scripts
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    for line in (
        "--partition=gpu",
        "--account=proj42",
        "--nodes=2",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--cpus-per-task=6",
        "--time=600",
        "--mem=256GB",
        "--job-name=knet-train",
        # Lightning's requeue signal, not submitit's USR2, and a job scontrol may requeue
        "--signal=USR1@120",
        "--requeue",
    ):
        assert f"#SBATCH {line}\n" in single, (line, single)
    assert "USR2" not in single
    assert f"#SBATCH --output={sweep_dir}/.submitit/%j/%j_0_log.out" in single
    # a sweep is one job array: one SLURM job per sweep job, each with its own nodes
    assert "#SBATCH --array=0-1%2\n" in array
    assert f"#SBATCH --output={sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out" in array


def test_the_launcher_config_prints_with_cfg_hydra(tmp_path: Path) -> None:
    out = run_cli(["hydra/launcher=submitit_slurm", "trainer=slurm", "hydra.launcher.partition=gpu",
                   "hydra.launcher.nodes=2", "--cfg", "hydra"], tmp_path)  # fmt: skip
    launcher = OmegaConf.create(out[out.index("hydra:") :]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.max_num_timeout) == ("gpu", 2, 8, 0)
    # resolved on reading: Lightning's requeue signal, signal_delay_s before the limit
    assert launcher.additional_parameters.signal == "USR1@120" and launcher.additional_parameters.requeue is True


def test_submitit_local_launcher_composes(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, ["hydra/launcher=submitit_local"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "LocalLauncher"
    assert launcher.params["submitit_folder"] == f"{cfg.hydra.sweep.dir}/.submitit/%j"


@pytest.mark.parametrize("procid,local,node", [(0, 0, 0), (5, 1, 1), (7, 3, 1)])
def test_trainer_slurm_reads_ranks_and_world_size_from_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, procid: int, local: int, node: int
) -> None:
    # 2 nodes x 4 tasks; task `procid` of job 4242
    _simulate(
        monkeypatch,
        slurm_env(
            "4242", ntasks=8, procid=procid, nnodes=2, SLURM_NODELIST="node[7-8]", SLURM_JOB_NODELIST="node[7-8]"
        ),
    )
    cfg = compose_cfg(tmp_path, CPU_SLURM)
    assert cfg.hydra.run.dir == f"{tmp_path}/logs/train/runs/slurm-4242"
    assert cfg.auto_resume is True
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    environment = trainer._accelerator_connector.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment"
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1
    assert type(trainer.strategy).__name__ == "HydraDDPStrategy"
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (procid, local, node, 8)
    assert (trainer.num_devices, trainer.num_nodes) == (4, 2)
    assert environment.main_address == "node7"
    # the DDP ranks are SLURM's tasks: Lightning starts no process of its own
    assert environment.creates_processes_externally
    # the checkpoint IO of every trainer config is still there
    assert type(trainer.strategy.checkpoint_io).__name__ == "SafeCheckpointIO"

    # srun inside `salloc` (job name "interactive"): Lightning's own detection stands aside there,
    # the configured plugin does not, and the ranks are still SLURM's
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    trainer = hydra.utils.instantiate(compose_cfg(tmp_path, CPU_SLURM).trainer, logger=False)
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "SLURMEnvironment"
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (procid, local, node, 8)


def test_trainer_slurm_outside_a_job_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate(monkeypatch, {})
    cfg = compose_cfg(tmp_path, CPU_SLURM)
    with pytest.raises(Exception, match="trainer=slurm runs inside a SLURM job"):
        str(cfg.hydra.run.dir)
    with pytest.raises(ValueError, match="SLURM_NTASKS is not set"):
        slurm_environment()


def test_the_requeued_id_of_an_array_task_is_array_id_and_index(monkeypatch: pytest.MonkeyPatch) -> None:
    from knet_lightning.runtime.signals import requeue_job_id

    _simulate(monkeypatch, slurm_env("4343"))
    assert requeue_job_id() == "4343"
    # a sweep's job: submitit submits one array, and scontrol takes <array id>_<index>
    _simulate(monkeypatch, slurm_env("4345", SLURM_ARRAY_JOB_ID="4342", SLURM_ARRAY_TASK_ID="2"))
    assert requeue_job_id() == "4342_2"


def test_auto_resume_takes_the_newest_of_last_and_hpc(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    trainer = Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt_dir = tmp_path / "checkpoints"
    assert auto_resume_path(trainer, ckpt_dir) is None  # a new run
    ckpt_dir.mkdir()
    last = ckpt_dir / "last.ckpt"
    last.write_bytes(b"last")
    os.utime(last, (1000, 1000))
    assert auto_resume_path(trainer, ckpt_dir) == str(last)
    for n, mtime in ((1, 900), (2, 1100)):  # Lightning restores its highest number
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"hpc")
        os.utime(tmp_path / f"hpc_ckpt_{n}.ckpt", (mtime, mtime))
    # the requeue checkpoint is newer: Lightning's own "hpc", resolved by Lightning
    assert auto_resume_path(trainer, ckpt_dir) == "hpc"
    assert trainer._checkpoint_connector._hpc_resume_path == str(tmp_path / "hpc_ckpt_2.ckpt")
    # SIGTERM after the requeue wrote last.ckpt later: that one
    os.utime(last, (1200, 1200))
    assert auto_resume_path(trainer, ckpt_dir) == str(last)


def test_a_taken_requeue_signal_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    _simulate(monkeypatch, slurm_env("77"))
    trainer = hydra.utils.instantiate(compose_cfg(tmp_path, CPU_SLURM).trainer, logger=False)
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        assert check_requeue_signal(trainer)
        signal.signal(signal.SIGUSR1, lambda *_: None)  # e.g. SUBMITIT_PREEMPT_SIGNAL=USR1
        assert not check_requeue_signal(trainer)
        assert "Lightning will not install its SLURM requeue handler" in caplog.text
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_ranks_stopped_by_sigterm_do_not_fail_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    from types import SimpleNamespace

    from knet_lightning.runtime import distributed

    # a rank started by this process that stopped on the SIGTERM passed on to it: exit 143
    for ok_codes, fails in (((0,), True), ((0, 143), False)):
        child = subprocess.Popen(["sh", "-c", "exit 143"])
        monkeypatch.setattr(distributed, "_launchers", [SimpleNamespace(procs=[child])])
        if fails:
            with pytest.raises(RuntimeError, match="exited with 143"):
                distributed.end_of_job(ok_codes=ok_codes)
        else:
            distributed.end_of_job(ok_codes=ok_codes)


# ---------------------------------------------------------------------- requeue and resume

# 8 training images, batch 2: 4 steps in one epoch; one validation batch, no test pass
RUN_TINY = [o for o in CLI_TINY if not o.startswith("trainer.limit_train_batches=")] + [
    "trainer.limit_val_batches=1",
    "test_after_fit=false",
    "callbacks.prediction_overlays=null",
]
STEPS = 4


def _ckpt(path: Path) -> dict[str, Any]:
    from knet_lightning.checkpoint.io import load_checkpoint_file

    return load_checkpoint_file(path)


def _wait_until(done: Callable[[], bool], what: str, proc: Any, timeout: float = 240) -> None:
    """Polls ``done()`` while ``proc`` runs; otherwise stops it and fails with ``what`` and the end
    of its log."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"no {what}; the run ended with {proc.returncode}:\n{proc.log_path.read_text()[-4000:]}")
        time.sleep(0.05)


def _wait_for(path: Path, proc: Any, timeout: float = 240) -> None:
    _wait_until(path.exists, path.name, proc, timeout)


def _wait_for_requeues(record: Path, n: int, proc: Any) -> None:
    """Until the fake scontrol has recorded its ``n``-th call."""
    _wait_until(lambda: record.exists() and record.read_text().count("\n") >= n, f"scontrol call {n}", proc, 60)


def _wait_for_log(proc: Any, text: str) -> None:
    _wait_until(lambda: text in proc.log_path.read_text(), repr(text), proc, 60)


def test_time_limit_requeues_twice_and_every_instance_resumes_where_the_last_stopped(tmp_path: Path) -> None:
    """Signal ownership under trainer=slurm (one task), end to end. SIGUSR1 (StepBoundarySignals
    over Lightning's handler): hpc_ckpt_<n>.ckpt and `scontrol requeue` at the end of the step in
    progress; SIGTERM (Lightning's flag, our PreemptionCheckpoint): last.ckpt at the step
    boundary, exit 143. Each requeued instance (same job id, same command, no ckpt_path) opens the
    same folder and continues from its newest checkpoint, whichever of the two wrote it."""
    record = tmp_path / "scontrol.args"
    fake_scontrol(tmp_path / "bin", record)
    run_dir = tmp_path / "logs" / "train" / "runs" / "slurm-4242"
    flags, starts = tmp_path / "flags", tmp_path / "start"
    args = [*CPU_SLURM, *RUN_TINY, "+callbacks.pause._target_=slurm_utils.PauseAtStep", f"+callbacks.pause.flag_dir={flags}",
            "+callbacks.start._target_=slurm_utils.StartStep", f"+callbacks.start.out_dir={starts}"]  # fmt: skip

    def instance(restart: int, *pause: str) -> Any:
        env = cli_env(
            tmp_path,
            **slurm_env("4242", SLURM_RESTART_COUNT=str(restart)),
            MASTER_PORT=str(free_port()),
            PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        )
        return start_cli([*args, *pause], tmp_path, env)

    # 1. the time limit: SIGUSR1 during step 2 (the run paused after step 1 goes on when it is
    # noted): checkpoint and requeue at the end of step 2; then SIGTERM as SLURM ends the instance
    proc = instance(0, "+callbacks.pause.at_steps=[1,2]", "+callbacks.pause.release=any")
    _wait_for(flags / "paused1.rank0", proc)
    os.kill(proc.pid, signal.SIGUSR1)
    _wait_for(flags / "paused2.rank0", proc)
    _wait_for_requeues(record, 1, proc)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=240)
    log = proc.log_path.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, log[-4000:]
    assert "SIGUSR1: checkpoint and requeue after this step" in log and "Bypassing SIGTERM" in log
    assert "Handling auto-requeue signal" not in log  # Lightning's mid-step handler did not run
    assert record.read_text() == "requeue 4242\n"
    assert _ckpt(run_dir / "hpc_ckpt_1.ckpt")["global_step"] == 2
    assert _ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert "a run in this folder continues from it (auto_resume)" in log

    # 2. requeued: continues from last.ckpt (written after the hpc checkpoint). The next time
    # limit comes late: SIGUSR1 and SIGTERM both before the end of step 3. The run stops there,
    # and the requeue is not lost: hpc_ckpt_2.ckpt and a second `scontrol requeue`
    proc = instance(1, "+callbacks.pause.at_steps=[3]")
    _wait_for(flags / "paused3.rank0", proc)
    os.kill(proc.pid, signal.SIGUSR1)
    _wait_for_log(proc, "SIGUSR1: checkpoint and requeue after this step")
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=240)
    log = proc.log_path.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, log[-4000:]
    assert f"auto_resume: continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in log
    assert record.read_text() == "requeue 4242\nrequeue 4242\n"
    assert _ckpt(run_dir / "hpc_ckpt_2.ckpt")["global_step"] == 3
    assert _ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3

    # 3. requeued again: continues from Lightning's hpc_ckpt_2.ckpt (written after last.ckpt) and finishes
    proc = instance(2, "+callbacks.pause.at_steps=[]")
    out = wait_cli(proc)
    assert (
        f"auto_resume: continuing from {run_dir / 'hpc_ckpt_2.ckpt'} (the newest checkpoint of this run folder; "
        "SLURM restart 2)" in out
    )
    assert start_steps(starts) == [0, 2, 3]
    assert _ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    assert "val/pq" in json.loads((run_dir / "metrics.json").read_text())
    assert OmegaConf.load(run_dir / "config_resolved.yaml").run_name == "slurm-4242"
    # one run folder for the three instances, and no further requeue
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == ["slurm-4242"]
    assert record.read_text().count("requeue") == 2


# ---------------------------------------------------------------------- sweep


def _local_sweep(tmp_path: Path, grid: list[str]) -> tuple[Path, str, list[dict[str, str]]]:
    from test_sweep import SWEEP_TINY, _summary

    sweep_dir = tmp_path / "multirun"
    out = run_cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            *grid,
            *SWEEP_TINY,
            "trainer.limit_train_batches=1",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
    )
    rows = _summary(sweep_dir)
    # the columns of the basic launcher's sweep (test_sweep.py)
    assert list(rows[0])[:8] == ["job", "N", "S", "task", "params_m", "gflops", "throughput", "status"]
    for row in rows:
        assert row["status"] == "done" and row["task"] == "panoptic"
        assert float(row["params_m"]) > 1 and float(row["gflops"]) > 0 and float(row["throughput"]) > 0
        assert row["val/pq"] != "" and row["val/pq_s1"] != ""
        assert ("val/pq_s2" in row and row["val/pq_s2"] != "") == (row["S"] == "2")
    markdown = (sweep_dir / "summary.md").read_text().splitlines()
    assert markdown[0].startswith("| job | N | S |") and len(markdown) == 2 + len(rows)
    # each job ran in a process of submitit's, which logged under the sweep folder
    logs = sorted(sweep_dir.glob(".submitit/*/*_log.out"))
    assert len(logs) == len(rows), sorted(str(p.relative_to(sweep_dir)) for p in sweep_dir.rglob("*"))
    assert all("Starting with JobEnvironment" in p.read_text() for p in logs)
    assert "sweep summary" in out
    return sweep_dir, out, rows


def test_grid_sweep_2x2_through_submitit_local_writes_the_summary(tmp_path: Path) -> None:
    # each job pickled by the launcher, unpickled and run in a process of submitit's (4 on 2 cores:
    # about 50 s)
    _, _, rows = _local_sweep(tmp_path, ["model.num_proposals=4,6", "model.num_stages=1,2"])
    # the rows of the basic launcher's sweep (test_sweep.py)
    assert sorted((int(r["N"]), int(r["S"])) for r in rows) == [(4, 1), (4, 2), (6, 1), (6, 2)]


# ---------------------------------------------------------------------- exact resume under DDP

# 2 CPU processes, 1 image each per step: 4 steps per epoch over 8 images, 2 epochs; dropout and
# flips (the RNG states matter), a step checkpoint every 3 steps and one at every epoch end (steps
# 3, 4, 6, 8), validation at the end
DDP_RESUME = [
    "trainer=ddp_cpu",
    *[o for o in RUN_TINY if not o.startswith(("data.batch_size=", "trainer.max_epochs="))],
    "data.batch_size=1",
    "data.flip_prob=0.5",
    "model.net.dropout=0.1",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "trainer.check_val_every_n_epoch=2",
    "callbacks.step_checkpoint.every_n_train_steps=3",
]
DDP_STEPS = 8


@pytest.fixture(scope="module")
def ddp_baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp_uninterrupted")
    run_cli([*DDP_RESUME, f"hydra.run.dir={root / 'run'}", *probe_overrides(root / "probe")], root)
    probes = read_probes(root / "probe")
    assert probes[0]["final_weights"] == probes[1]["final_weights"]
    return root / "run"


@pytest.mark.slow  # 3 two-process runs (baseline, killed, resumed): about 70 s
def test_ddp_killed_job_resumes_exactly(tmp_path: Path, ddp_baseline: Path) -> None:
    run_dir = tmp_path / "run"
    # both ranks die after step 5 without warning, in epoch 1, which no validation preceded;
    # last.ckpt is epoch 0's end (step 4), so at most the epoch the run was in is lost
    proc = start_cli(
        [
            *DDP_RESUME,
            f"hydra.run.dir={run_dir}",
            "+callbacks.kill._target_=slurm_utils.KillAtStep",
            "+callbacks.kill.at_step=5",
        ],
        tmp_path,
    )
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.log_path.read_text()[-4000:]
    state = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert (state["epoch"], state["global_step"]) == (0, 4)

    run_cli(
        [
            *DDP_RESUME,
            f"hydra.run.dir={run_dir}",
            "ckpt_path=last",
            "+callbacks.start._target_=slurm_utils.StartStep",
            f"+callbacks.start.out_dir={tmp_path / 'start'}",
        ],
        tmp_path,
    )
    assert start_steps(tmp_path / "start", 0) == start_steps(tmp_path / "start", 1) == [4]
    assert_same_run(run_dir, ddp_baseline, DDP_STEPS)


@pytest.mark.slow  # 2 two-process runs after the shared baseline: about 45 s
def test_ddp_sigterm_stops_every_rank_at_one_step_and_the_run_resumes_exactly(
    tmp_path: Path, ddp_baseline: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = start_cli(
        [
            *DDP_RESUME,
            f"hydra.run.dir={run_dir}",
            "+callbacks.pause._target_=slurm_utils.PauseAtStep",
            "+callbacks.pause.at_steps=[2]",
            f"+callbacks.pause.flag_dir={tmp_path / 'flags'}",
        ],
        tmp_path,
    )
    for rank in (0, 1):
        _wait_for(tmp_path / "flags" / f"paused2.rank{rank}", proc)
    # to rank 0 only, as a scheduler signals the process it started; Lightning's launcher passes
    # it on to the rank it started
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    log = proc.log_path.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, log[-6000:]
    assert "Traceback" not in log, log[-6000:]
    # noted between steps 2 and 3, acted on by both ranks at the end of step 3 (StepBoundarySignals)
    assert _ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3

    # auto_resume: no ckpt_path, as after a SLURM requeue
    out = run_cli([*DDP_RESUME, f"hydra.run.dir={run_dir}", "auto_resume=true"], tmp_path)
    assert f"auto_resume: continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in out
    assert_same_run(run_dir, ddp_baseline, DDP_STEPS)


@pytest.mark.slow  # 2 x 2 task processes: about 30 s; test_time_limit_requeues_twice... covers one task in CI
def test_a_two_task_slurm_job_requeues_once_and_both_tasks_resume(tmp_path: Path) -> None:
    """Two tasks of one simulated SLURM job (srun's environment, one CPU rank each), both paused
    after step 2 when SLURM signals them: one hpc checkpoint, one `scontrol requeue` (global
    rank 0's), last.ckpt from the SIGTERM, all at the end of step 3, the first step boundary
    after the signals; the requeued tasks continue from step 3 in step."""
    record = tmp_path / "scontrol.args"
    fake_scontrol(tmp_path / "bin", record)
    run_dir = tmp_path / "logs" / "train" / "runs" / "slurm-5151"
    args = [
        *CPU_SLURM,
        *[o for o in DDP_RESUME if not o.startswith("trainer=")],
        "+callbacks.pause._target_=slurm_utils.PauseAtStep",
        "+callbacks.pause.at_steps=[2]",
        f"+callbacks.pause.flag_dir={tmp_path / 'flags'}",
        "+callbacks.start._target_=slurm_utils.StartStep",
        f"+callbacks.start.out_dir={tmp_path / 'start'}",
        *probe_overrides(tmp_path / "probe"),
    ]

    def tasks(restart: int) -> list[Any]:
        port = str(free_port())
        return [
            start_cli(
                args,
                tmp_path / f"task{rank}",
                cli_env(
                    tmp_path,
                    **slurm_env("5151", ntasks=2, procid=rank, SLURM_RESTART_COUNT=str(restart)),
                    MASTER_PORT=port,
                    PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                ),
            )
            for rank in (0, 1)
        ]

    procs = tasks(0)
    for rank in (0, 1):
        _wait_for(tmp_path / "flags" / f"paused2.rank{rank}", procs[rank])
    # SLURM signals every task of the step; the ranks act on both at the end of step 3, together
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        for proc in procs:
            os.kill(proc.pid, signum)
        time.sleep(0.5)
    for proc in procs:
        proc.wait(timeout=240)
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, procs[0].log_path.read_text()[-4000:]
    assert record.read_text() == "requeue 5151\n"
    assert sorted(p.name for p in run_dir.glob("*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert _ckpt(run_dir / "hpc_ckpt_1.ckpt")["global_step"] == 3
    assert _ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3

    for proc in tasks(1):
        wait_cli(proc)
    assert start_steps(tmp_path / "start", 0) == start_steps(tmp_path / "start", 1) == [0, 3]
    probes = read_probes(tmp_path / "probe")
    assert probes[0]["world_size"] == 2 and probes[0]["final_weights"] == probes[1]["final_weights"]
    assert _ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"] == DDP_STEPS
    assert record.read_text() == "requeue 5151\n"
