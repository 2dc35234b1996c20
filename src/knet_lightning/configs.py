"""The Python side of ``conf/``, registered in one place before Hydra composes a config.

Structured configs (Hydra's ConfigStore), the single source of these settings' defaults and
types, so that a misspelled key in an experiment file fails at composition:

* ``model/postprocess``: ``panoptic``, ``instance``, ``semantic`` (:mod:`knet_lightning.tasks.settings`);
* ``model/optimizer``: ``adamw`` and ``model/scheduler``: ``warmup_step`` (:mod:`knet_lightning.training.optim`);
* ``model/test_time``: ``default`` (whole image, single scale; ``mode``, ``tta``, ... set on it,
  :mod:`knet_lightning.inference.test_time`).

Resolvers:

* ``${knet.root_dir:}`` (``paths/default.yaml``): ``$KNET_ROOT``, else the working directory.
  It must not read Hydra's runtime node: in a multirun the launcher resolves
  ``hydra.sweep.dir`` (built on ``paths.log_dir``) before Hydra's config is set, and
  ``${hydra:runtime.cwd}`` would fail there. ``hydra.job.chdir`` is false, so the working
  directory of every job is the one the command started in.
* ``${knet.log_suffix:}`` (``hydra/default.yaml``): the per-process log file suffix of DDP runs.
* ``${knet.sweep_group:}`` and ``${knet.sweep_tags:tags,N,S}`` (``logger/wandb.yaml``): the W&B
  group and tags of a sweep's jobs.
* ``${knet.slurm_job_id:}`` (``trainer/slurm.yaml``): the SLURM job id that names the run folder.

``conf/hydra/launcher/submitit_slurm.yaml`` has the name of hydra-submitit-launcher's structured
config ``submitit_slurm``, so Hydra validates it against that config and merges it on top
(``_load_single_config`` in Hydra 1.3's ``config_loader_impl.py``): the plugin's fields and
defaults, ours where we set them, and a misspelled key fails at composition. Hydra calls that
matching deprecated and warns at every composition; the warning is filtered here for that one file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf


def root_dir() -> str:
    """The project root that data and logs live under: ``$KNET_ROOT`` or the working directory."""
    return os.environ.get("KNET_ROOT") or os.getcwd()


def _resolvers() -> dict[str, Callable[..., Any]]:
    from knet_lightning.runtime.distributed import log_file_suffix
    from knet_lightning.runtime.slurm import slurm_job_id
    from knet_lightning.runtime.sweep import sweep_group, sweep_tags

    return {
        "knet.root_dir": root_dir,
        "knet.log_suffix": log_file_suffix,
        "knet.sweep_group": sweep_group,
        "knet.sweep_tags": sweep_tags,
        "knet.slurm_job_id": slurm_job_id,
    }


def register_configs() -> None:
    """Registers every ``knet.*`` resolver and the structured configs (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from knet_lightning.inference.test_time import TestTimeSettings
    from knet_lightning.tasks import TASKS
    from knet_lightning.training.optim import OptimizerSettings, SchedulerSettings

    for name, fn in _resolvers().items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    store = ConfigStore.instance()
    for name, task in TASKS.items():
        store.store(group="model/postprocess", name=name, node=task.settings_cls)
    store.store(group="model/optimizer", name="adamw", node=OptimizerSettings)
    store.store(group="model/scheduler", name="warmup_step", node=SchedulerSettings)
    store.store(group="model/test_time", name="default", node=TestTimeSettings)
    warnings.filterwarnings(
        "ignore",
        message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema",
        category=UserWarning,
    )
    # Lightning 2.6's own use of torch 2.14's pytree API (lightning/pytorch/utilities/_pytree.py),
    # printed at every fit and nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
