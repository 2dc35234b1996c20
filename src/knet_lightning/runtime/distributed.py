"""DDP with Hydra: one run folder per job, evaluation without repeated images, clean multiruns.

Lightning's plain ``ddp`` starts ranks 1..n-1 by re-running ``sys.argv``. Under Hydra that
goes wrong in three ways, all fixed here:

* in a multirun, ``sys.argv`` holds ``-m`` and the sweep's comma lists, so every child would
  start a sweep of its own; and Lightning points the children at ``hydra.run.dir``, which in a
  multirun is not the job's folder. :class:`HydraDDPStrategy` starts the children with the
  job's own overrides (``hydra.overrides.task``), in RUN mode, in the job's output folder;
* the DDP environment the launcher leaves in ``os.environ`` (``LOCAL_RANK``, ``MASTER_PORT``,
  ...) and the process group it initialised would make the next job of a multirun believe its
  children already exist: :func:`end_of_job` waits for the children and restores both;
* ``DistributedSampler`` pads the evaluation split by repeating images so that every rank gets
  as many; PQ / mIoU would count those images twice. :func:`eval_sampler` gives an
  ``UnrepeatedDistributedSampler`` instead (ranks may differ by one image; evaluation has no
  per-batch collective, so that is safe).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

# what Lightning's launcher writes into os.environ of the process that starts the ranks
DDP_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")
# rank variables set by Lightning's launcher (LOCAL_RANK, NODE_RANK), torchrun (RANK, GROUP_RANK)
# and SLURM (SLURM_PROCID): a process is global rank zero only if all that are set are 0
RANK_ENV_KEYS = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")

_launchers: list[HydraSubprocessLauncher] = []
_env_before: dict[str, str | None] | None = None


def log_file_suffix() -> str:
    """``""`` on global rank zero, else a suffix naming the process (``.rank3``,
    ``.node1.local0``): every process of a DDP run shares the run folder, and each keeps its own
    log file instead of interleaving lines in one. Used as ``${knet.log_suffix:}``."""
    if is_global_zero_from_env():
        return ""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key) not in (None, ""):
            return f".rank{int(os.environ[key])}"
    node = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)
    return f".node{node}.local{int(os.environ.get('LOCAL_RANK') or 0)}"


def is_global_zero_from_env() -> bool:
    """Whether this process is global rank zero, before any Trainer exists.

    Lightning's ``rank_zero_only.rank`` is read from ``RANK`` / ``LOCAL_RANK`` / ``SLURM_PROCID``
    at import; on node 1 of a launch with ``NODE_RANK=1`` it still says 0 until the strategy
    sets up, so early file writes ask here instead.
    """
    for key in RANK_ENV_KEYS:
        value = os.environ.get(key)
        if value not in (None, "") and int(value) != 0:
            return False
    return True


def eval_sampler(dataset: Dataset, trainer: Any) -> UnrepeatedDistributedSampler | None:
    """A sampler that gives each rank a disjoint share of ``dataset`` and repeats nothing, or
    ``None`` when the trainer is not distributed (the loader then reads in order)."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs or int(kwargs.get("num_replicas", 1)) <= 1:
        return None
    if len(dataset) < int(kwargs["num_replicas"]):  # type: ignore[arg-type]
        raise ValueError(
            f"evaluation split has {len(dataset)} images for {kwargs['num_replicas']} processes: "  # type: ignore[arg-type]
            "every process needs at least one; use fewer devices or more evaluation images"
        )
    return UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs)


def _hydra_override_value(value: str) -> str:
    """A path as a quoted Hydra override value (``=``, ``:``, spaces and the like are legal)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def child_command(local_rank: int) -> tuple[list[str], str | None]:
    """The command line that starts rank ``local_rank`` of this Hydra job, and its cwd.

    The child gets this job's overrides (in a multirun: the sweep point, not the comma lists),
    RUN mode, and this job's output folder as its run folder, without a second ``.hydra``.
    """
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    command = [sys.executable, "-m", "knet_lightning"]
    if hc.job.config_name:
        command += ["--config-name", str(hc.job.config_name)]
    for source in hc.runtime.config_sources:
        # a --config-dir given on the command line must reach the children too
        if source.provider == "command-line" and source.schema == "file":
            command += ["--config-dir", str(source.path)]
    command += list(hc.overrides.task)
    command += [
        f"hydra.run.dir={_hydra_override_value(str(hc.runtime.output_dir))}",
        "hydra.mode=RUN",
        "hydra.output_subdir=null",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
    ]
    return command, str(hc.runtime.cwd)


class HydraSubprocessLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher, starting the children with :func:`child_command` when a
    Hydra job runs (without Hydra, Lightning's re-run of ``sys.argv`` is right)."""

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            super()._call_children_scripts()
            return
        self._check_can_spawn_children()
        self.procs = []
        _remember_env()
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            command, cwd = child_command(local_rank)
            log.info("starting rank %d: %s", local_rank, " ".join(command))
            self.procs.append(subprocess.Popen(command, env=env, cwd=cwd))
        _launchers.append(self)


class HydraDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose re-launched ranks join the same Hydra job (see the module doc).

    Everything else is Lightning's DDP: NCCL or gloo, SLURM / torchrun / manual
    ``MASTER_ADDR``+``NODE_RANK`` environments, ``num_nodes``.
    """

    def setup(self, trainer: Any) -> None:
        # torch's SyncBatchNorm refuses CPU modules: trainer=ddp on a node without a GPU (one
        # gloo process) keeps plain BatchNorm rather than failing
        if self._layer_sync is not None and self.root_device.type != "cuda":
            log.warning("trainer.sync_batchnorm needs GPUs; this CPU run keeps plain BatchNorm")
            self._layer_sync = None
        super().setup(trainer)

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = HydraSubprocessLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            super()._configure_launcher()


def _remember_env() -> None:
    global _env_before
    if _env_before is None:
        _env_before = {key: os.environ.get(key) for key in DDP_ENV_KEYS}


def end_of_job(timeout: float = 600.0, ok_codes: tuple[int, ...] = (0,)) -> None:
    """After a job that started DDP ranks: wait for them, tear the process group down and
    restore the environment, so that the next job of a multirun starts its own ranks.

    A child that exits with a code outside ``ok_codes`` makes this raise, so a sweep never
    reports a job whose other ranks failed as finished (a run stopped by SIGTERM passes 143: its
    ranks stopped with it). A no-op in processes that started no ranks.
    """
    global _env_before
    failed: list[str] = []
    try:
        for launcher in _launchers:
            for proc in launcher.procs:
                try:
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                if code not in ok_codes:
                    failed.append(f"pid {proc.pid} exited with {code}")
        if _launchers and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    finally:
        _launchers.clear()
        if _env_before is not None:
            for key, value in _env_before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _env_before = None
    if failed:
        raise RuntimeError("DDP ranks of this job failed: " + "; ".join(failed))
