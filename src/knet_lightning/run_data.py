"""The data set a run reads: its data module from the config, the class counts from the data set's
files, the data config a checkpoint stores and ``mode=eval`` restores, and ``mode=check_data``; and the
files a run reads and writes besides (``ckpt_path=last``, the run folder).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from knet_lightning.checkpoint.io import checkpoint_entry
from knet_lightning.checkpoint.keys import DATA_CONFIG_KEY
from knet_lightning.settings import command_line_overrides, override_key

log = logging.getLogger("knet_lightning")

# keys of the data config that describe the data set rather than construct the data module
DATA_META_KEYS = ("num_things", "num_stuff", "num_classes")


def build_datamodule(cfg: DictConfig) -> Any:
    # the project's data folder (data/ by default) is created on first use by a data set that
    # lives in it (the synthetic one is generated there); a data.root outside it must already
    # exist, and a run that reads one (mode=convert data.root=/data/coco) leaves no empty data/
    data_dir = Path(cfg.paths.data_dir)
    root = OmegaConf.select(cfg, "data.root", default=None)
    if root is None or Path(str(root)).resolve().is_relative_to(data_dir.resolve()):
        data_dir.mkdir(parents=True, exist_ok=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    for key in DATA_META_KEYS:
        data_cfg.pop(key, None)
    return hydra.utils.instantiate(data_cfg, _convert_="partial")


def class_counts(class_info: Any) -> dict[str, int]:
    """``num_things`` / ``num_stuff`` / ``num_classes`` of a data set's classes (things first)."""
    things = sum(bool(t) for t in class_info.isthing)
    return {"num_things": things, "num_stuff": len(class_info.names) - things, "num_classes": len(class_info.names)}


def check_class_counts(cfg: DictConfig, class_info: Any) -> bool:
    """The class counts come from the data set's files: ``data.num_things`` / ``num_stuff`` /
    ``num_classes`` left null (the COCO-format configs) are filled in from ``class_info``; a typed
    one must equal it, since a mismatch would silently train the wrong classifier. Returns whether
    a count was filled in."""
    counts = class_counts(class_info)
    filled = False
    for key, value in counts.items():
        typed = cfg.data.get(key)
        if typed is None:
            with open_dict(cfg):
                cfg.data[key] = value
            filled = True
        elif int(typed) != value:
            raise ValueError(
                f"data.{key}={typed} but the data set's categories give {value} ({counts['num_things']} things, "
                f"{counts['num_stuff']} stuff); drop data.{key} to take the count from the data set, or fix it"
            )
    return filled


def check_data(cfg: DictConfig, datamodule: Any) -> None:
    """Builds the data sets this run reads before the Trainer exists, so that a missing data
    root or a wrong layout fails with the reader's ``DatasetError`` (naming the path) before any
    step."""
    stage = {"train": "fit", "eval": "test"}.get(str(cfg.mode))
    if stage is not None:
        datamodule.setup(stage)


def stored_data_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's data config as checkpoints store it (:data:`DATA_CONFIG_KEY`): resolved, with the
    class counts the data set gave."""
    return OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[return-value]


def eval_checkpoint_file(cfg: DictConfig) -> str | None:
    """The checkpoint file ``mode=eval`` names explicitly (None: another mode, no checkpoint,
    ``ckpt_path=last``, which is a training run's, or a missing file, reported where it is loaded)."""
    ckpt = cfg.ckpt_path
    if cfg.mode != "eval" or ckpt is None or str(ckpt) == "last" or not Path(str(ckpt)).is_file():
        return None
    return str(ckpt)


def checkpoint_data_config(cfg: DictConfig) -> dict[str, Any] | None:
    """The stored data config (:data:`DATA_CONFIG_KEY`) that ``mode=eval ckpt_path=<file>`` reads its
    data set with: where the command line chooses no data set (no ``data=``, no ``experiment=``).
    None elsewhere, and for checkpoints written before the data config was stored."""
    ckpt = eval_checkpoint_file(cfg)
    if ckpt is None or any(override_key(o) in ("data", "experiment") for o in command_line_overrides()):
        return None
    return checkpoint_entry(ckpt, DATA_CONFIG_KEY)


def data_config_from_checkpoint(cfg: DictConfig) -> None:
    """``mode=eval ckpt_path=<file>`` without a data set on the command line evaluates on the data
    set the checkpoint was trained on: its stored data config (reader, layout, classes, pipeline),
    with the command line's ``data.*`` values on top (``data.root=/data/mine``)."""
    stored = checkpoint_data_config(cfg)
    if stored is None:
        return
    data = OmegaConf.create(stored)
    keys = [override_key(o) for o in command_line_overrides()]
    typed = sorted({k.removeprefix("data.") for k in keys if k.startswith("data.")})
    for key in typed:
        OmegaConf.update(data, key, OmegaConf.select(cfg, f"data.{key}"), force_add=True)
    with open_dict(cfg):
        cfg.data = data
    log.info("mode=eval: the data set the checkpoint was trained on (%s)%s", stored.get("_target_"),
             f", with the command line's data.{', data.'.join(typed)}" if typed else "")  # fmt: skip


def run_data_check(cfg: DictConfig, datamodule: Any, output_dir: Path) -> None:
    """``mode=check_data``: the training and validation splits read without transforms and
    reported (:mod:`knet_lightning.data.check`); a defect is an error once the report is written."""
    from functools import partial

    from knet_lightning.data.check import check_split, summary_lines, write_report
    from knet_lightning.data.meta import DatasetError

    datamodule.prepare_data()
    class_info = datamodule.class_info
    check_class_counts(cfg, class_info)
    splits = datamodule.splits
    roles = ["train"] + (["val"] if splits["val"] != splits["train"] else [])
    reports = [
        check_split(role, partial(datamodule.make_dataset, role, None), class_info.num_classes) for role in roles
    ]
    out_dir = output_dir / "data_check"
    record = write_report(class_info, reports, out_dir)
    for line in summary_lines(class_info, reports):
        print(line)
    log.info("data check: %s (class_histogram.png beside it)", out_dir / "data_check.json")
    if record["problems"]:
        first = next(f"{name}: {message}" for r in reports for name, message in r.problems)
        raise DatasetError(f"data check: {record['problems']} problem(s), each named in {out_dir / 'data_check.json'}; "
                           f"the first: {first}")  # fmt: skip


def _experiment_choice() -> str | None:
    """This run's ``experiment`` option (``None`` when it has none, or outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get("experiment")
    return None if choice in (None, "null") else str(choice)


def run_identity(run_dir: Path) -> tuple[str | None, str | None] | None:
    """``(experiment, model.task)`` of an earlier run folder, from the ``.hydra/hydra.yaml`` and
    ``config_resolved.yaml`` it wrote; ``None`` for a folder our CLI did not write."""
    hydra_file, config_file = run_dir / ".hydra" / "hydra.yaml", run_dir / "config_resolved.yaml"
    if not (hydra_file.is_file() and config_file.is_file()):
        return None
    try:
        choices = OmegaConf.load(hydra_file).hydra.runtime.choices
        task = OmegaConf.select(OmegaConf.load(config_file), "model.task")
    except Exception:  # an unreadable folder is not a candidate
        return None
    experiment = choices.get("experiment")
    return (None if experiment in (None, "null") else str(experiment), task)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path`` as a file. ``last`` means this run folder's ``checkpoints/last.ckpt`` if it
    exists (resuming with ``hydra.run.dir=<old run>``), else the newest ``last.ckpt`` of an
    earlier training run (``<log_dir>/train/runs/*``) of the same experiment and task; runs of
    other experiments, tasks or of ``debug=...`` presets are never picked. The choice is logged."""
    ckpt = cfg.ckpt_path
    if ckpt is None:
        return None
    if str(ckpt) != "last":
        path = Path(str(ckpt))
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt}: no such checkpoint file")
        return str(path)
    here = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if here.is_file():
        log.info("ckpt_path=last: %s (this run folder)", here)
        return str(here)
    wanted = (_experiment_choice(), OmegaConf.select(cfg, "model.task"))
    runs = sorted(
        (p for p in Path(cfg.paths.log_dir).glob("train/runs/*/checkpoints/last.ckpt")
         if run_identity(p.parent.parent) == wanted),
        key=lambda p: (p.stat().st_mtime, str(p)),
    )  # fmt: skip
    if not runs:
        raise FileNotFoundError(
            f"ckpt_path=last: no last.ckpt in {here.parent} nor in a training run of experiment={wanted[0]} "
            f"(task {wanted[1]}) under {cfg.paths.log_dir}/train/runs/*/checkpoints/; give ckpt_path=<file>"
        )
    log.info("ckpt_path=last: %s (the newest training run of experiment=%s, task %s: %s)",
             runs[-1], wanted[0], wanted[1], runs[-1].parent.parent)  # fmt: skip
    return str(runs[-1])


def check_output_dir(path: Path) -> None:
    """Fail before any work if the run folder cannot be written."""
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"output folder {path} is not writable: {err}") from err
