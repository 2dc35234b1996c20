"""The "On a SLURM cluster" commands (docs/guides/slurm.md), run as written on a stand-in cluster
(``fake_slurm.py``: ``sbatch``/``srun``/``sacct``/``scontrol`` on this machine, nodes on loopback
addresses), and what happens at a job's time limit: the 2-node run signalled while it trains, and
(``make test-all``) the sbatch example's one-task job.

Only size-reducing settings are added to the page's commands: a tiny network and data set (as in
``test_readme.py``), one CPU task per node instead of eight GPUs (``hydra.launcher.gpus_per_node=1``
appended; for the sbatch script ``--ntasks-per-node=1`` before its name, where sbatch takes its
options, which win over the script's ``#SBATCH`` lines)."""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fake_slurm
import pytest
import torch
from docs_blocks import blocks, commands, section
from omegaconf import OmegaConf
from test_readme import ONE_EPOCH, TINY_COCO, TINY_KERNELS, TINY_NET, _write_coco_panoptic

ROOT = Path(__file__).resolve().parents[1]
PAGE = "docs/guides/slurm.md"
SECTION = "# On a SLURM cluster"
ONE_TASK_PER_NODE = "hydra.launcher.gpus_per_node=1"
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"


def slurm_commands() -> list[str]:
    """The commands of the page's first bash block, continuation lines joined, comments dropped."""
    page = blocks(section(PAGE, SECTION))
    assert page, f"{PAGE} has no bash block"
    return commands(page[0])


def sbatch_example() -> str:
    """The page's batch script, which must be the repository's ``scripts/slurm/train.sbatch`` (the
    file the ``sbatch`` command above submits)."""
    (example,) = [block for block in blocks(section(PAGE, SECTION)) if block.startswith("#!/bin/bash")]
    return example


def test_the_page_shows_the_sbatch_example_as_it_is_in_the_repository() -> None:
    assert sbatch_example() == SBATCH.read_text()


class Cluster:
    """A fresh clone's folder (``scripts/`` copied), a tiny COCO, and the fake SLURM on ``PATH``."""

    def __init__(self, tmp_path: Path) -> None:
        self.cwd = tmp_path / "clone"
        shutil.copytree(ROOT / "scripts" / "slurm", self.cwd / "scripts" / "slurm")
        self.coco = tmp_path / "coco"
        _write_coco_panoptic(self.coco)
        self.state = tmp_path / "slurm"
        bin_dir = fake_slurm.install(tmp_path / "bin", self.state)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("KNET_ROOT", "KNET_CONFIG_DIR") and not k.startswith("SLURM_")
        }
        # `python` in the batch script is this interpreter, as in an activated environment
        path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]])
        self.env = dict(env, PATH=path, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1",
                        OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))  # fmt: skip

    def start(self, command: str, extra: list[str], **env: str) -> tuple[str, subprocess.Popen]:
        """``command`` as the page writes it (``/data/coco`` filled in), ``extra`` appended."""
        args = shlex.split(command.replace("/data/coco", str(self.coco)))
        if args[0] == "python":
            args[0] = sys.executable
        if args[0] == "sbatch":
            script = next(i for i, a in enumerate(args) if a.endswith(".sbatch"))
            args[script:script] = ["--ntasks-per-node=1"]
        proc = subprocess.Popen(args + extra, cwd=self.cwd, env={**self.env, **env}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        return command, proc

    @staticmethod
    def finish(started: tuple[str, subprocess.Popen]) -> str:
        """Waits for the command; its stdout and stderr."""
        command, proc = started
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{command}\n{stdout[-3000:]}\n{stderr[-6000:]}"
        return stdout + stderr

    def run(self, command: str, extra: list[str], **env: str) -> str:
        return self.finish(self.start(command, extra, **env))

    def wait(self) -> dict[str, dict]:
        return fake_slurm.wait_for_jobs(self.state)


def _tiny(args: str) -> list[str]:
    """The size-reducing overrides of ``test_readme`` (a swept key keeps its values)."""
    kernels = [o for o in TINY_KERNELS if o.split("=")[0] + "=" not in args]
    return TINY_NET + kernels + ONE_EPOCH + TINY_COCO


def _summary(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_documented_slurm_commands_run_as_written(tmp_path: Path) -> None:
    commands = slurm_commands()
    assert len(commands) == 3, commands  # a run, a sweep, the sbatch example: each checked below
    run, sweep, own = commands
    assert "hydra.launcher.nodes=2" in run and "hydra/launcher=submitit_slurm" in run
    cluster = Cluster(tmp_path)
    multiruns = cluster.cwd / "logs" / "train" / "multiruns"
    # all three at once (the launchers mostly wait), the second launcher a second after the first
    # opened its multirun folder, whose name is the start time to the second
    started = [cluster.start(sweep, [ONE_TASK_PER_NODE, *_tiny(sweep)]), cluster.start(own, _tiny(own))]
    deadline = time.monotonic() + 120
    while not list(multiruns.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.1)
    started.append(cluster.start(run, [ONE_TASK_PER_NODE, *_tiny(run)]))
    sweep_out, own_out, run_out = (cluster.finish(s) for s in started)
    states = cluster.wait()
    assert {s["state"] for s in states.values()} == {"COMPLETED"}, states
    assert "sweep summary" in run_out and "sweep summary" in sweep_out
    by_script = {}
    for state in states.values():
        by_script.setdefault(Path(state["script"]).name, []).append(state)
    (own_job,) = by_script.pop("train.sbatch")
    launched = sorted(by_script.values(), key=len)
    assert [len(jobs) for jobs in launched] == [1, 4]
    (run_job,), sweep_jobs = launched
    sweeps = {len(_summary(d)): d for d in multiruns.glob("*")}
    assert sorted(sweeps) == [1, 4]

    # 1. one run on 2 nodes: one SLURM job of 2 tasks (one per "node"), DDP over both
    assert run_job["nodes"] == 2 and run_job["tasks_per_node"] == 1
    options = run_job["options"]
    assert options["signal"] == "USR1@120" and options["requeue"] == "1" and options["partition"] == "gpu"
    run_dir = sweeps[1] / "0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "metrics.json").is_file()
    resolved = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert (resolved.trainer.num_nodes, resolved.trainer.devices) == (2, 1)  # from the job's SLURM_* variables
    # rank 0 logged to train.log, rank 1 to its own file; submitit kept each task's stdout/stderr
    assert (run_dir / "train.log").is_file() and (run_dir / "train.rank1.log").is_file()
    logs = sweeps[1] / ".submitit" / run_job["key"]
    assert (logs / f"{run_job['key']}_0_log.out").is_file() and (logs / f"{run_job['key']}_1_log.err").is_file()
    assert [r["status"] for r in _summary(sweeps[1])] == ["done"]

    # 2. the sweep: one job array, each of its 4 tasks a job of its own on one node
    assert {s["nodes"] for s in sweep_jobs} == {1} and len({s["job_id"] for s in sweep_jobs}) == 4
    assert len({s["array_job_id"] for s in sweep_jobs}) == 1
    rows = _summary(sweeps[4])
    assert sorted((r["N"], r["S"]) for r in rows) == [("100", "1"), ("100", "3"), ("50", "1"), ("50", "3")]
    assert {r["status"] for r in rows} == {"done"}
    assert len(list(sweeps[4].glob(".submitit/*_*/*_0_log.out"))) == 4

    # 3. the sbatch example: 2 nodes x 1 task, the run folder named after the job
    job_id = re.search(r"Submitted batch job (\d+)", own_out).group(1)
    assert own_job["job_id"] == job_id and (own_job["nodes"], own_job["tasks_per_node"]) == (2, 1)
    run_dir = cluster.cwd / "logs" / "train" / "runs" / f"slurm-{job_id}"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "metrics.json").is_file()
    assert (run_dir / "train.rank1.log").is_file()
    assert f"run folder: {run_dir}" in (cluster.cwd / f"slurm-knet-train-{job_id}.out").read_text()


# ---------------------------------------------------------------------- the time limit

TIME_LIMIT_AT_STEP = 3  # of 6: 3 epochs of the fixture's 2 training images, one per step


def _time_limited(flags: Path) -> list[str]:
    """The run pauses after step 3 and writes ``paused3.rank0`` there; the fake cluster takes
    that file as the time limit (``FAKE_SLURM_TIME_LIMIT``)."""
    return [
        "trainer.max_epochs=3", "data.batch_size=1",
        "+callbacks.pause._target_=slurm_utils.PauseAtStep", f"+callbacks.pause.at_steps=[{TIME_LIMIT_AT_STEP}]",
        f"+callbacks.pause.flag_dir={flags}",
        "+callbacks.start._target_=slurm_utils.StartStep", f"+callbacks.start.out_dir={flags}",
    ]  # fmt: skip


def _assert_requeued_once_and_resumed(cluster: Cluster, key: str, run_dir: Path, flags: Path) -> None:
    from slurm_utils import start_steps

    state = cluster.wait()[key]
    # the first instance ended by the SIGTERM after the requeue, the second ran to its end
    assert state["state"] == "COMPLETED" and state["restarts"] == 1, state
    assert state["exit_codes"][-1] == 0 and len(state["exit_codes"]) == 2
    requeues = [c for c in fake_slurm.calls(cluster.state) if c[0] == "scontrol"]
    assert len(requeues) == 1 and requeues[0][1] == "requeue"  # by Lightning, on SIGUSR1
    assert start_steps(flags) == [0, TIME_LIMIT_AT_STEP]  # the second instance went on from step 3
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6
    assert (run_dir / "metrics.json").is_file()


def _tiny_limited(command: str) -> list[str]:
    return [o for o in _tiny(command) if not o.startswith("trainer.max_epochs=")]


MID_TRAINING_STEPS = 8  # 8 epochs of one step: 2 ranks, one image each


def test_a_two_node_launcher_job_signalled_mid_training_is_requeued_and_resumes_in_step(tmp_path: Path) -> None:
    """The page's 2-node run (two instances of a 2-task job: about 60 s); the time limit comes
    after step 3 while both tasks train on (SIGUSR1, then SIGTERM a second later, to every task,
    wherever each is): one hpc checkpoint and one requeue, both ranks stop after the same step and
    the requeued job goes on from it. With Lightning's own handlers this job hangs."""
    from slurm_utils import start_steps

    cluster = Cluster(tmp_path)
    flags = tmp_path / "flags"
    run = slurm_commands()[0]
    marker = ["+callbacks.mark._target_=slurm_utils.MarkStep", "+callbacks.mark.at_step=3",
              f"+callbacks.mark.flag_dir={flags}",
              "+callbacks.start._target_=slurm_utils.StartStep", f"+callbacks.start.out_dir={flags}"]  # fmt: skip
    # no test after fit: the page commands' test runs it
    cluster.run(run, [ONE_TASK_PER_NODE, *_tiny_limited(run), f"trainer.max_epochs={MID_TRAINING_STEPS}",
                      "data.batch_size=1", "test_after_fit=false", *marker],
                FAKE_SLURM_TIME_LIMIT=str(flags / "at3.rank0"), FAKE_SLURM_TIME_LIMIT_GRACE="1")  # fmt: skip
    (sweep,) = (cluster.cwd / "logs" / "train" / "multiruns").glob("*")
    ((key, state),) = cluster.wait().items()
    assert state["state"] == "COMPLETED" and state["restarts"] == 1 and state["nodes"] == 2, state
    requeues = [c for c in fake_slurm.calls(cluster.state) if c[0] == "scontrol"]
    assert requeues == [["scontrol", "requeue", key]]
    log = "".join(p.read_text() for p in sorted((sweep / ".submitit" / key).glob("*_log.*")))
    # each rank logs where it stopped, into its own task's files: the same step
    stopped = sorted({int(m) for m in re.findall(r"stopped by SIGTERM at step (\d+)", log)})
    assert len(stopped) == 1 and 3 <= stopped[0] < MID_TRAINING_STEPS, log[-4000:]
    # both ranks of the second instance started where the first stopped
    assert start_steps(flags, 0) == start_steps(flags, 1) == [0, stopped[0]]
    run_dir = sweep / "0"
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert 3 <= hpc["global_step"] <= stopped[0]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == MID_TRAINING_STEPS
    assert [r["status"] for r in _summary(sweep)] == ["done"]  # the launcher waited through the requeue


@pytest.mark.slow  # two instances of one job: about 35 s
def test_an_sbatch_job_at_its_time_limit_is_requeued_and_resumes_in_its_folder(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    flags = tmp_path / "flags"
    own = slurm_commands()[2]
    out = cluster.run(own.replace("sbatch ", "sbatch --nodes=1 ", 1), [*_tiny_limited(own), *_time_limited(flags)],
                      FAKE_SLURM_TIME_LIMIT=str(flags / f"paused{TIME_LIMIT_AT_STEP}.rank0"))  # fmt: skip
    job_id = re.search(r"Submitted batch job (\d+)", out).group(1)
    run_dir = cluster.cwd / "logs" / "train" / "runs" / f"slurm-{job_id}"
    _assert_requeued_once_and_resumed(cluster, job_id, run_dir, flags)
    log = (cluster.cwd / f"slurm-knet-train-{job_id}.out").read_text()
    # --open-mode=append: both instances in one file, the second one's auto_resume logged
    assert "stopped by SIGTERM at step 3" in log and "auto_resume: continuing from" in log
