"""The Python side of ``conf/``, registered in one place before Hydra composes a config.

Structured configs (Hydra's ConfigStore), the single source of these settings' defaults and
types, so that a misspelled key in an experiment file fails at composition:

* ``run_settings``: :class:`RunSettings`, the top-level keys of a run (``mode``, ``seed``,
  ``ckpt_path``, ...; ``conf/train.yaml`` lists it first in its defaults and documents the keys);
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
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf


@dataclass
class PredictSettings:
    """``predict.*``: how ``mode=predict`` runs the Segmenter built from ``ckpt_path``."""

    batch_size: int = 1
    device: str = "auto"  # cuda when available, else cpu
    precision: str = "auto"  # fp32 | bf16 | auto: bf16 autocast where the device has fast bf16 kernels
    stage: int = -1  # the stage output to read (-1: the last, as evaluation reads it)
    overlays: bool = True  # an overlay with a legend per image, under <predict_output_dir>/overlays/
    backend: str = "torch"  # torch | onnxruntime (ckpt_path: an .onnx file of mode=export, or a checkpoint)


@dataclass
class ServeSettings:
    """``serve.*``: the HTTP server of ``mode=serve`` (:mod:`knet_lightning.serving`)."""

    host: str = "127.0.0.1"  # 127.0.0.1: this machine only; 0.0.0.0: every interface
    port: int = 8000
    device: str = "auto"  # cuda when available, else cpu
    precision: str = "auto"  # fp32 | bf16 | auto, as predict.precision
    stage: int = -1
    backend: str = "torch"  # torch | onnxruntime (ckpt_path: an .onnx file of mode=export, or a checkpoint)
    max_batch_size: int = 4  # requests run as one batch (1: no batching)
    batch_timeout: float = 0.01  # seconds a batch waits to fill
    workers_per_device: int = 1  # inference worker processes per device, each with its own model
    threads: int | None = None  # torch threads per worker (null: the CPU's cores shared among the workers)
    api_servers: int = 1  # HTTP server processes
    timeout: float = 60.0  # seconds a request may wait for a worker before a 504
    max_bytes: int = 20_000_000  # a larger upload is refused with 413
    max_pixels: int = 16_777_216  # an image of more pixels (width x height) is refused with 413 (4096^2)


@dataclass
class RunSettings:
    """The run's top-level keys, typed, with their defaults (``conf/train.yaml`` explains each one
    and sets none of them): a misspelled key or a value of the wrong type fails at composition,
    naming the key. The config groups (``data``, ``model``, ...) are their own configs."""

    mode: str = "train"  # train | eval | predict | serve | convert | export | check_data (cli.MODES)
    task_name: str = "${mode}"
    tags: list[str] = field(default_factory=lambda: ["dev"])
    seed: int = 42
    ckpt_path: str | None = None
    auto_resume: bool = False
    run_name: str = "${now:%Y-%m-%d}_${now:%H-%M-%S}"
    load_from: str | None = None
    load_from_strict: bool = True
    convert_source: str | None = None
    convert_output: str | None = None
    export_output: str | None = None
    export_stage: int = -1
    trusted_checkpoint: bool = False
    base_batch_size: int | None = None
    batch_remedy: str = "none"  # none | scale_lr | accumulate
    max_bad_steps: int = 20
    test_after_fit: bool = True
    optimized_metric: str | None = "val/pq"
    inputs: str | None = None
    predict_output_dir: str = "${paths.output_dir}/predictions"
    predict: PredictSettings = field(default_factory=PredictSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    compile: bool = False
    matmul_precision: str | None = "high"
    strict_reproduction: bool = False
    export_predictions: bool = False
    secret_keys: list[str] = field(default_factory=list)
    # the config groups of train.yaml's defaults list
    data: Any = None
    model: Any = None
    callbacks: Any = None
    logger: Any = None
    trainer: Any = None
    paths: Any = None


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The run's config with every interpolation resolved and secrets redacted (without the
    ``hydra`` node, which is Hydra's own and records raw command-line overrides)."""
    from knet_lightning.runtime.secrets import redact

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return redact(container, container.get("secret_keys"))


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
    store.store(name="run_settings", node=RunSettings)
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
