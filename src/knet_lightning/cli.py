"""Hydra entry point: ``python -m knet_lightning`` / ``knet-lightning``.

``mode=train`` fits and then tests the best checkpoint, ``mode=eval`` tests ``ckpt_path``,
``mode=predict`` writes predictions for ``inputs``, ``mode=serve`` serves ``ckpt_path`` over HTTP,
``mode=export`` writes an ONNX file, ``mode=convert`` converts a published checkpoint. Every run gets its own folder
(``logs/<task>/runs/<date_time>/``) holding the resolved config, checkpoints, logs and overlays.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from knet_lightning.checkpoint import rebuild as checkpoint_rebuild
from knet_lightning.checkpoint.model import DATA_BOUND_KEYS, load_network_weights, without_initial_weights
from knet_lightning.configs import register_configs, resolved_config
from knet_lightning.errors import summary as error_summary
from knet_lightning.run_data import (
    build_datamodule,
    check_class_counts,
    check_data,
    check_output_dir,
    checkpoint_data_config,
    data_config_from_checkpoint,
    eval_checkpoint_file,
    resolve_ckpt_path,
    run_data_check,
    stored_data_config,
)
from knet_lightning.runtime.distributed import end_of_job, is_global_zero_from_env
from knet_lightning.runtime.loggers import finish_loggers, print_results
from knet_lightning.runtime.reproduction import apply_strict_reproduction, strict_runtime
from knet_lightning.runtime.secrets import hide_secret_overrides, redact, redact_hydra_dump
from knet_lightning.runtime.slurm import auto_resume_path, check_requeue_signal
from knet_lightning.settings import command_line_overrides, override_key

log = logging.getLogger("knet_lightning")
# the knet.* resolvers and structured configs of conf/, before @hydra.main composes any config
register_configs()


def config_dir() -> str:
    """The folder holding ``train.yaml``: ``$KNET_CONFIG_DIR``, else the checkout's ``conf/``,
    else the copy shipped inside the installed package."""
    env = os.environ.get("KNET_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "train.yaml").is_file():
        return str(checkout)
    shipped = Path(str(resources.files("knet_lightning") / "conf"))
    if (shipped / "train.yaml").is_file():
        return str(shipped)
    raise FileNotFoundError(
        f"knet-lightning configs not found: looked for {checkout}/train.yaml and {shipped}/train.yaml; "
        "set KNET_CONFIG_DIR to the folder holding train.yaml"
    )


def check_model_handles(cfg: DictConfig) -> None:
    """``model.num_stages`` and ``model.num_proposals`` checked against the task before any data is
    read (a count the task cannot evaluate would otherwise fail only at the first evaluation)."""
    from knet_lightning.tasks import TASKS

    task = TASKS.get(str(OmegaConf.select(cfg, "model.task", default=None)))
    if task is not None:  # an unknown task is build_task's error
        select = OmegaConf.select
        task.check_model_counts(select(cfg, "model.num_stages", default=None),
                                select(cfg, "model.num_proposals", default=None))  # fmt: skip


def build_model(cfg: DictConfig, class_info: Any, ckpt_path: str | None = None) -> Any:
    """The ``KNetModule`` of ``cfg.model`` with the data set's class metadata.

    For ``mode=eval`` the network is the one ``ckpt_path`` was trained with, rebuilt by
    :func:`~knet_lightning.checkpoint.rebuild.rebuild_module` (as predict, the Segmenter and export
    rebuild it); there, for ``mode=convert`` and with ``load_from=`` no initial (ImageNet) weights
    are loaded.
    """
    check_class_counts(cfg, class_info)  # the network's class counts are the data set's
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs = {"max_bad_steps": cfg.max_bad_steps, "compile": cfg.compile}
    if ckpt_path is not None and cfg.mode == "eval":
        # a data set read from the checkpoint's own data config fits its task and classes by construction
        data_bound = () if checkpoint_data_config(cfg) is not None else DATA_BOUND_KEYS
        return checkpoint_rebuild.rebuild_module(
            ckpt_path, config=model_cfg, overrides=command_line_overrides(), mode="eval", data_bound=data_bound,
            class_info=class_info, trusted=cfg.trusted_checkpoint, weights=False, **kwargs,
        ).module  # fmt: skip  # weights=False: trainer.test restores the whole checkpoint
    if cfg.mode == "convert" or (cfg.mode == "train" and cfg.load_from):
        model_cfg = without_initial_weights(model_cfg)
    return checkpoint_rebuild.instantiate_module(
        model_cfg, list(class_info.names), list(class_info.isthing), [list(c) for c in class_info.colors], **kwargs
    )


def build_callbacks(cfg: DictConfig) -> list[Any]:
    callbacks_cfg = cfg.callbacks or {}
    return [hydra.utils.instantiate(c) for c in callbacks_cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list[Any]:
    from knet_lightning.runtime.loggers import drop_lightning_noise

    drop_lightning_noise()  # before the Trainer built next: its advertisement, among others
    logger_cfg = cfg.logger or {}
    wandb_cfg = logger_cfg.get("wandb") if isinstance(logger_cfg, DictConfig) else None
    if isinstance(wandb_cfg, DictConfig) and "api_key" in wandb_cfg:
        raise ValueError(
            "logger.wandb.api_key: W&B takes its key from the environment, never from a config or the command "
            "line (which Hydra and W&B record): run `wandb login` once, or set WANDB_API_KEY"
        )
    return [
        # plain, redacted containers: W&B cannot serialise an OmegaConf node passed as its run
        # config, and a secret in a logger's settings must not reach the run's config
        hydra.utils.instantiate(redact(OmegaConf.to_container(c, resolve=True), cfg.secret_keys), _convert_="all")
        for c in logger_cfg.values()
        if isinstance(c, DictConfig) and "_target_" in c
    ]


def run(cfg: DictConfig) -> float | None:
    """Run one job described by a composed config; returns ``optimized_metric`` if measured."""
    loggers: list[Any] = []
    # first and last lines of every run, failed ones included: where to look
    log.info("run folder: %s", cfg.paths.output_dir)
    # the ranks this process started exit as it does: 0, or 143 when SIGTERM stopped the run
    # (Lightning's launcher passes the signal on to them, each writes its part of last.ckpt)
    rank_codes: tuple[int, ...] = (0,)
    try:
        return _run(cfg, loggers)
    except SystemExit as err:
        if err.code == 128 + signal.SIGTERM:
            rank_codes = (0, 128 + signal.SIGTERM)
        raise
    except BaseException as err:
        # Hydra prints the error on the console only: the run's log file keeps it too, as one
        # line that comes before Hydra's traceback on the console
        log.error("run failed: %s", error_summary(err, str(cfg.paths.output_dir)))
        raise
    finally:
        finish_loggers(loggers)
        # DDP: wait for the ranks this job started and reset the process group and DDP
        # environment, so that the next job of a multirun starts its own ranks
        end_of_job(ok_codes=rank_codes)
        log.info("run folder: %s", cfg.paths.output_dir)


def write_resolved_config(resolved: dict[str, Any], output_dir: Path) -> None:
    """``config_resolved.yaml``: every interpolation resolved, secrets redacted."""
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))


def published_numbers_in_fp32(cfg: DictConfig) -> None:
    """``mode=eval`` of a checkpoint that ``mode=convert`` wrote (published weights) runs in fp32,
    as the published numbers were computed, unless the command line sets ``trainer.precision``
    (e.g. the ``bf16-mixed`` of ``trainer=gpu``, which moves labels; README, Use the published weights)."""
    ckpt = eval_checkpoint_file(cfg)
    if ckpt is None or "trainer.precision" in map(override_key, command_line_overrides()):
        return
    from knet_lightning.checkpoint.convert import conversion_record

    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    if precision in ("32", "32-true") or conversion_record(ckpt) is None:
        return
    log.info("mode=eval of a converted checkpoint: trainer.precision=32-true (the published numbers' precision) "
             "instead of %s; set trainer.precision on the command line to choose", precision)  # fmt: skip
    with open_dict(cfg):
        cfg.trainer.precision = "32-true"


def run_convert(cfg: DictConfig, loggers: list[Any]) -> None:
    """``mode=convert``: a published checkpoint into ours (:mod:`knet_lightning.checkpoint.convert`)."""
    from knet_lightning.checkpoint.convert import convert_checkpoint

    if not cfg.convert_source:
        raise ValueError("mode=convert needs convert_source=<published checkpoint .pth>")
    datamodule = build_datamodule(cfg)
    output = Path(cfg.convert_output or Path(cfg.paths.output_dir) / "checkpoints" / "converted.ckpt")
    class_info = datamodule.class_info
    module = build_model(cfg, class_info)  # with the class counts the data set gives
    module.inference_config = datamodule.inference_settings()
    module.data_config = stored_data_config(cfg)
    convert_checkpoint(cfg.convert_source, output, module, class_info.names)
    log.info("converted checkpoint: %s (mode=eval ckpt_path=%s, or load_from=%s to fine-tune)", output, output, output)


def run_check_data(cfg: DictConfig, loggers: list[Any]) -> None:
    """``mode=check_data``: the training and validation splits read and reported (:mod:`knet_lightning.data.check`)."""
    run_data_check(cfg, build_datamodule(cfg), Path(cfg.paths.output_dir))


def run_export(cfg: DictConfig, loggers: list[Any]) -> None:
    """``mode=export``: the network of ``ckpt_path`` as one ONNX file (:mod:`knet_lightning.inference.onnx_export`);
    the checkpoint carries the network, classes and preprocessing: no data set is read."""
    from knet_lightning.inference.onnx_export import export_onnx

    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is None:
        raise ValueError("mode=export needs ckpt_path=<checkpoint> (or ckpt_path=last)")
    output = Path(cfg.export_output or Path(cfg.paths.output_dir) / "model.onnx")
    # the command line's model.* under the rebuild's policy, checked before the export
    export_onnx(ckpt_path, output, stage=int(cfg.export_stage), trusted=bool(cfg.trusted_checkpoint),
                config=OmegaConf.to_container(cfg.model, resolve=True), overrides=command_line_overrides())  # fmt: skip
    log.info("ONNX file: %s (Segmenter.from_checkpoint(path, backend='onnxruntime'), or mode=predict "
             "ckpt_path=%s predict.backend=onnxruntime)", output, output)  # fmt: skip


def run_predict(cfg: DictConfig, loggers: list[Any]) -> None:
    """``mode=predict``: a :class:`~knet_lightning.Segmenter` from ``ckpt_path`` over ``inputs``
    (:mod:`knet_lightning.inference.predict`); no data set is read: the classes are the checkpoint's."""
    from knet_lightning.inference.predict import collect_inputs, predict_to_folder
    from knet_lightning.inference.segmenter import Segmenter, run_device

    if not cfg.inputs:
        raise ValueError("mode=predict needs inputs=<image file, folder, glob or .txt list>")
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is None:
        raise ValueError("mode=predict needs ckpt_path=<checkpoint> (or ckpt_path=last)")
    inputs = collect_inputs(cfg.inputs)
    opts = cfg.predict
    device = run_device(str(opts.device), str(opts.backend))
    # the command line's model.* (post-processing, test time free; a typed key that contradicts the
    # checkpoint's network refused) under the rebuild's one policy, checked before building or exporting
    segmenter = Segmenter.from_checkpoint(ckpt_path, device=device, stage=int(opts.stage),
                                          trusted=bool(cfg.trusted_checkpoint), precision=str(opts.precision),
                                          backend=str(opts.backend),
                                          config=OmegaConf.to_container(cfg.model, resolve=True),
                                          overrides=command_line_overrides())  # fmt: skip
    log.info("predict: post-processing %s, test time %s", segmenter.module.task.settings.to_dict(),
             segmenter.test_time.describe())  # fmt: skip
    log.info("predict: %d image(s) with %s (%s, %s, %s)", len(inputs), ckpt_path, segmenter.task, device,
             segmenter.precision)  # fmt: skip
    summary = predict_to_folder(segmenter, inputs, cfg.predict_output_dir, batch_size=int(opts.batch_size),
                                overlays=bool(opts.overlays))  # fmt: skip
    # a run with skipped inputs says so at warning level, with each file's reason
    for line in summary.lines():
        (log.warning if summary.skipped else log.info)(line)
    log.info("predictions: %s", cfg.predict_output_dir)


def run_serve(cfg: DictConfig, loggers: list[Any]) -> None:
    """``mode=serve``: ``ckpt_path`` behind HTTP until interrupted (:mod:`knet_lightning.serving`),
    built as ``mode=predict`` builds it (the command line's ``model.*`` under the one rebuild policy)."""
    from knet_lightning.serving.server import serve_checkpoint

    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is None:
        raise ValueError("mode=serve needs ckpt_path=<checkpoint, or an .onnx file with serve.backend=onnxruntime>")
    serve_checkpoint(str(ckpt_path), OmegaConf.to_container(cfg.serve, resolve=True),
                     model_config=OmegaConf.to_container(cfg.model, resolve=True),
                     overrides=command_line_overrides(), trusted=bool(cfg.trusted_checkpoint))  # fmt: skip


class _Fit(NamedTuple):
    """What ``mode=train`` and ``mode=eval`` run: the data, the module, the trainer, the checkpoint."""

    datamodule: Any
    model: Any
    trainer: Any
    ckpt_path: str | None


def _fit_setup(cfg: DictConfig, loggers: list[Any]) -> _Fit:
    """The data module (class counts checked), the module (``mode=eval``: the checkpoint's
    network), the loggers and the Trainer, for ``mode=train`` and ``mode=eval``."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    class_info = datamodule.class_info
    counts_filled = check_class_counts(cfg, class_info)
    # the run's record and its loggers' hyperparameters, with the counts the data set's files gave
    resolved = resolved_config(cfg)
    if counts_filled and is_global_zero_from_env():
        write_resolved_config(resolved, Path(cfg.paths.output_dir))
    # the single-scale preprocessing, for checkpoints; then multi-scale + flip reads the images at
    # their original size (it resizes them itself)
    inference_config = datamodule.inference_settings()
    if OmegaConf.select(cfg, "model.test_time.tta", default=False):
        datamodule.keep_eval_size()
    check_data(cfg, datamodule)
    ckpt_path = resolve_ckpt_path(cfg)
    model = build_model(cfg, class_info, ckpt_path)
    model.inference_config = inference_config
    model.data_config = stored_data_config(cfg)
    if not model.test_time.is_plain:
        log.info("test-time strategy: %s", model.test_time.describe())
    if cfg.mode == "train":  # before loggers and Trainer start
        model.task.check_training_set(datamodule.datasets.get("train"))
        if cfg.load_from and ckpt_path is not None:
            raise ValueError("give either load_from= (start from its weights) or ckpt_path= (resume), not both")
        if cfg.load_from:
            load_network_weights(model, cfg.load_from, trusted=cfg.trusted_checkpoint, strict=cfg.load_from_strict)
    loggers.extend(build_loggers(cfg))
    for logger in loggers:
        logger.log_hyperparams(resolved)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=loggers or False)
    log.info("precision: %s (trainer.precision)", trainer.precision)
    return _Fit(datamodule, model, trainer, ckpt_path)


def _metrics(trainer: Any, prefix: str = "") -> dict[str, Any]:
    return {k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


def _finish(cfg: DictConfig, fit: _Fit, metrics: dict[str, Any]) -> float | None:
    """The results table and ``metrics.json``; returns ``optimized_metric`` if measured."""
    metrics = {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) or isinstance(v, (int, float))}
    trainer = fit.trainer
    if trainer.is_global_zero:
        print_results(f"K-Net {fit.model.task.name} ({cfg.mode})", metrics, caption=f"precision {trainer.precision}")
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics.get(cfg.optimized_metric or "")


def run_train(cfg: DictConfig, loggers: list[Any]) -> float | None:
    """``mode=train``: fit, then test the best checkpoint (``test_after_fit``)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from knet_lightning.training.global_batch import apply_global_batch

    fit = _fit_setup(cfg, loggers)
    model, trainer, datamodule, ckpt_path = fit.model, fit.trainer, fit.datamodule, fit.ckpt_path
    apply_global_batch(trainer, model, int(cfg.data.batch_size), cfg.base_batch_size, str(cfg.batch_remedy))
    output_dir = Path(cfg.paths.output_dir)
    # a requeued SLURM job (trainer=slurm) comes back to its folder with no ckpt_path: it
    # continues from the folder's newest checkpoint (knet_lightning/runtime/slurm.py)
    if ckpt_path is None and cfg.auto_resume:
        ckpt_path = auto_resume_path(trainer, output_dir / "checkpoints")
    check_requeue_signal(trainer)
    # checkpoints load with torch.load(weights_only=True) unless trusted (checkpoint/io.py)
    weights_only = not bool(cfg.trusted_checkpoint)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)
    except SIGTERMException:
        # PreemptionCheckpoint has written last.ckpt at the step boundary; no test, no
        # metrics.json (the run is not finished), and the code a SIGTERM-ed process exits with
        how = ("a run in this folder continues from it (auto_resume)" if cfg.auto_resume
               else f"resume with ckpt_path=last hydra.run.dir={output_dir}")  # fmt: skip
        log.warning("stopped by SIGTERM at step %d; %s", trainer.global_step, how)
        raise SystemExit(128 + signal.SIGTERM) from None
    metrics = _metrics(trainer)
    # trainer.test(verbose=False): the results table at the end prints the test metrics, once
    if cfg.test_after_fit and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("no best checkpoint was saved; testing the last weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=weights_only, verbose=False)
        metrics.update(_metrics(trainer, "test/"))
    elif cfg.test_after_fit:
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update(_metrics(trainer, "test/"))
    return _finish(cfg, fit, metrics)


def run_eval(cfg: DictConfig, loggers: list[Any]) -> float | None:
    """``mode=eval``: test ``ckpt_path`` (its network, rebuilt); ``export_predictions``: a second,
    streamed pass writes the test split in the official formats."""
    from knet_lightning.training.callbacks import PredictionExport

    if cfg.ckpt_path is None:
        raise ValueError("mode=eval needs ckpt_path=<checkpoint> (or ckpt_path=last)")
    fit = _fit_setup(cfg, loggers)
    trainer, model, datamodule = fit.trainer, fit.model, fit.datamodule
    trainer.test(model, datamodule=datamodule, ckpt_path=fit.ckpt_path, weights_only=not bool(cfg.trusted_checkpoint),
                 verbose=False)  # fmt: skip
    metrics = _metrics(trainer)
    if cfg.export_predictions:
        exporter = PredictionExport(cfg.predict_output_dir, datamodule.class_info)
        trainer.callbacks.append(exporter)
        trainer.predict(model, dataloaders=datamodule.test_dataloader(), return_predictions=False)
        log.info("wrote %d predictions to %s", exporter.count, cfg.predict_output_dir)
    return _finish(cfg, fit, metrics)


# mode -> what runs it; every mode gets _prepare first
MODES: dict[str, Callable[[DictConfig, list[Any]], float | None]] = {
    "train": run_train,
    "eval": run_eval,
    "predict": run_predict,
    "serve": run_serve,
    "convert": run_convert,
    "export": run_export,
    "check_data": run_check_data,
}


def mode_function(mode: str) -> Callable[[DictConfig, list[Any]], float | None]:
    """The function that runs ``mode``; an unknown one is an error listing the valid ones."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    return MODES[mode]


def _prepare(cfg: DictConfig) -> None:
    """What every mode does first: numerics and seed, early checks, the run folder and its record."""
    import lightning as L

    if cfg.strict_reproduction:
        apply_strict_reproduction(cfg, command_line_overrides())
        strict_runtime()
    if cfg.matmul_precision:
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    # quietly: the seed is in config_resolved.yaml, and "Seed set to" told no user anything
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # an int: RunSettings
    check_model_handles(cfg)
    output_dir = Path(cfg.paths.output_dir)
    check_output_dir(output_dir)
    published_numbers_in_fp32(cfg)
    data_config_from_checkpoint(cfg)
    # not Lightning's rank_zero_only yet: before the strategy sets up, it says 0 on node 1 too
    if is_global_zero_from_env():
        redact_hydra_dump(output_dir, cfg.secret_keys)
        write_resolved_config(resolved_config(cfg), output_dir)


def _run(cfg: DictConfig, loggers: list[Any]) -> float | None:
    run_mode = mode_function(str(cfg.mode))  # before any work
    _prepare(cfg)
    return run_mode(cfg, loggers)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run(cfg)


def main() -> float | None:
    """``python -m knet_lightning`` / ``knet-lightning``: the Hydra app, with secret-looking
    overrides moved off the command line first (see :mod:`knet_lightning.runtime.secrets`)."""
    sys.argv = hide_secret_overrides(sys.argv, os.environ)
    return _hydra_main()


if __name__ == "__main__":
    main()
