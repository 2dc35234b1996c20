"""The Hydra app end to end: composition of every config group, train → eval → predict,
resume from last.ckpt, W&B offline, bad configs failing early."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import hydra
import pytest
import torch
from cli_utils import compose_cfg, metrics_csv, run_cfg, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import LightningDataModule, Trainer
from omegaconf import OmegaConf
from wandb_utils import read_offline_run

from knet_lightning.cli import build_model, config_dir, print_results, resolve_ckpt_path
from knet_lightning.data.meta import ClassInfo
from knet_lightning.run_data import DATA_META_KEYS
from knet_lightning.runtime.secrets import hide_secret_overrides, redact, redact_hydra_dump

CONF = Path(config_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_config_dir_is_the_checkout_conf() -> None:
    assert (CONF / "train.yaml").is_file()
    assert CONF == Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("option", _options("data"))
def test_every_data_config_composes_and_its_datamodule_instantiates(tmp_path: Path, option: str) -> None:
    cfg = compose_cfg(tmp_path, [f"data={option}"])
    for key in DATA_META_KEYS:
        assert key in cfg.data, f"data/{option}.yaml lacks {key}"
    counts = [cfg.data[key] for key in DATA_META_KEYS]
    # fixed class lists state their counts; the COCO-format configs take theirs from the JSON (null)
    assert counts == [None] * 3 or cfg.data.num_classes == cfg.data.num_things + cfg.data.num_stuff, counts
    data_cfg = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in DATA_META_KEYS}
    dm = hydra.utils.instantiate(data_cfg, _convert_="partial")
    assert isinstance(dm, LightningDataModule)


@pytest.mark.parametrize("option", _options("model"))
def test_every_model_config_instantiates(tmp_path: Path, option: str) -> None:
    data = "ade20k" if option == "knet_semantic" else "synthetic"
    cfg = compose_cfg(
        tmp_path,
        [f"model={option}", f"data={data}", "~experiment", "model.net.backbone_depth=18"]
        + (["model.net.decode_head=uper"] if option == "knet_semantic" else []),
    )
    n = cfg.data.num_classes
    info = ClassInfo(names=tuple(f"c{i}" for i in range(n)), isthing=tuple(i < cfg.data.num_things for i in range(n)),
                     colors=tuple((i, i, i) for i in range(n)), dataset_ids=tuple(range(1, n + 1)))  # fmt: skip
    module = build_model(cfg, info)
    assert module.task.name == cfg.model.task
    images = torch.randn(2, 3, 64, 64)
    module.eval()
    with torch.no_grad():
        outputs = module(images)
    assert len(outputs) == cfg.model.num_stages + 1


@pytest.mark.parametrize("option", _options("trainer"))
def test_every_trainer_config_composes(tmp_path: Path, option: str) -> None:
    cfg = compose_cfg(tmp_path, [f"trainer={option}"])
    assert cfg.trainer._target_ == "lightning.pytorch.trainer.Trainer"
    if option in ("cpu", "ddp_cpu", "ddp"):  # ddp: every device of the node, one CPU process here
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert isinstance(trainer, Trainer)
        assert trainer.num_devices == (2 if option == "ddp_cpu" else 1)
    else:
        assert cfg.trainer.accelerator == ("gpu" if option == "gpu" else "auto")


@pytest.mark.parametrize("option", _options("logger"))
def test_every_logger_config_composes(tmp_path: Path, option: str) -> None:
    cfg = compose_cfg(tmp_path, [f"logger={option}"])
    for name, node in (cfg.logger or {}).items():
        assert "_target_" in node, name
        if name in ("csv", "wandb"):
            node = OmegaConf.merge(node, {"offline": True} if name == "wandb" else {})
            hydra.utils.instantiate(node)


@pytest.mark.parametrize("group", ["callbacks", "debug", "experiment", "hparams_search", "paths", "hydra"])
def test_every_other_group_composes(tmp_path: Path, group: str) -> None:
    for option in _options(group):
        cfg = compose_cfg(tmp_path, [f"{group}={option}"])
        assert cfg.mode == "train"
        if group == "callbacks":
            for node in (cfg.callbacks or {}).values():
                hydra.utils.instantiate(node)


@pytest.mark.parametrize("config_name,mode", [("train", "train"), ("eval", "eval"), ("predict", "predict")])
def test_entry_configs_set_the_mode(tmp_path: Path, config_name: str, mode: str) -> None:
    assert compose_cfg(tmp_path, [], config_name=config_name).mode == mode


def test_fast_dev_run_trains_and_writes_no_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_cfg(tmp_path, tiny_overrides("debug=fast_dev_run"))
    with caplog.at_level("INFO", logger="knet_lightning"):
        run_cfg(cfg)
    # the run folder is named at the start and at the end
    assert [r.getMessage() for r in caplog.records].count(f"run folder: {tmp_path / 'run'}") == 2
    assert (tmp_path / "run" / "config_resolved.yaml").is_file()
    assert list(tmp_path.rglob("*.ckpt")) == []  # the preset promises no checkpoint


def test_train_then_eval_then_predict_from_the_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_cfg(tmp_path / "a", tiny_overrides("debug=limit", "trainer.check_val_every_n_epoch=1"))
    with caplog.at_level(logging.INFO, logger="knet_lightning"):
        value = run_cfg(cfg)
    run_dir = tmp_path / "a" / "run"
    # each validation's results, in one line (the output stage's metrics; the per-stage ones in the files)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation, epoch 0 (step ")]
    assert "val/pq " in line and "val/miou " in line and "val/pq_s1" not in line
    assert (run_dir / "config_resolved.yaml").is_file()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val/pq", "test/pq", "test/sq", "test/rq", "test/miou", "val/pq_s1"} <= set(metrics)
    assert value == pytest.approx(metrics["val/pq"])
    overlays = list((run_dir / "overlays").rglob("*.png"))
    assert overlays, "validation overlays were not written"

    cfg = compose_cfg(
        tmp_path / "b", tiny_overrides(f"ckpt_path={last}", "export_predictions=true"), config_name="eval"
    )
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "a" / "data"), force_add=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="knet_lightning"):
        run_cfg(cfg)
    # an evaluation restores the checkpoint callbacks' state but tracks no best checkpoint: it writes none
    assert "tracked anew" not in caplog.text and not (tmp_path / "b" / "run" / "checkpoints").exists()
    eval_metrics = json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())
    assert eval_metrics["test/pq"] == pytest.approx(metrics["test/pq"], abs=1e-6)
    exported = tmp_path / "b" / "run" / "predictions"
    assert len(json.loads((exported / "panoptic.json").read_text())["annotations"]) == 4
    assert len(list((exported / "panoptic").glob("*.png"))) == 4

    images = tmp_path / "a" / "data" / "synthetic" / "val2017"
    cfg = compose_cfg(tmp_path / "c", tiny_overrides(f"ckpt_path={last}", f"inputs={images}"), config_name="predict")
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "a" / "data"), force_add=True)
    run_cfg(cfg)
    out = tmp_path / "c" / "run" / "predictions"
    pngs = sorted((out / "panoptic").glob("*.png"))
    assert len(pngs) == 4
    annotations = json.loads((out / "panoptic.json").read_text())["annotations"]
    assert len(annotations) == 4

    # an unreadable image is skipped with a warning naming it; the others are predicted (the
    # last batch of 2 holds only the unreadable one)
    mixed = tmp_path / "mixed"
    shutil.copytree(images, mixed)
    (mixed / "zz_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    cfg = compose_cfg(tmp_path / "d", tiny_overrides(f"ckpt_path={last}", f"inputs={mixed}", "data.val_batch_size=2"),
                      config_name="predict")  # fmt: skip
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "a" / "data"), force_add=True)
    with caplog.at_level(logging.WARNING):
        run_cfg(cfg)
    out = tmp_path / "d" / "run" / "predictions"
    assert len(json.loads((out / "panoptic.json").read_text())["annotations"]) == 4
    assert "skipped 1" in caplog.text and "skipped zz_truncated.jpg: " in caplog.text


def test_resume_from_last_checkpoint_continues_at_the_right_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 2 batches per epoch: a 1-epoch run ends at step 2; resuming for 2 epochs ends at step 4
    first = compose_cfg(
        tmp_path / "a",
        tiny_overrides("trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test_after_fit=false"),
    )
    run_cfg(first)
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2

    second = compose_cfg(
        tmp_path / "b",
        tiny_overrides(
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "test_after_fit=false",
            "trainer.max_epochs=2",
            f"ckpt_path={last}",
        ),
    )
    OmegaConf.update(second, "paths.data_dir", str(tmp_path / "a" / "data"), force_add=True)
    # capture the optimizer state right after the checkpoint is restored
    from lightning.pytorch import Callback

    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            seen["step"] = trainer.global_step
            seen["opt"] = copy.deepcopy(trainer.optimizers[0].state_dict())

    import knet_lightning.cli as cli

    original = cli.build_callbacks
    cli.build_callbacks = lambda cfg: original(cfg) + [Probe()]
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            run_cfg(second)
    finally:
        cli.build_callbacks = original
    assert seen["step"] == 2
    # a new folder: the best checkpoint is tracked anew there, in one line instead of Lightning's
    # warning per checkpoint callback (and no best_model_path pointing into the old folder)
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert caplog.text.count("is tracked anew in") == 1
    assert "`weights_only` was not set" not in caplog.text
    saved = state["optimizer_states"][0]["state"]
    restored = seen["opt"]["state"]
    assert saved.keys() == restored.keys()
    for k in saved:
        assert int(saved[k]["step"]) == int(restored[k]["step"])
        torch.testing.assert_close(saved[k]["exp_avg"], restored[k]["exp_avg"])
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4
    rows = metrics_csv(tmp_path / "b" / "run")
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps and min(steps) >= 2


def test_resume_in_its_folder_continues_the_csv_log(tmp_path: Path) -> None:
    """One run folder, one metrics.csv: the resumed run appends to version_0 (no version_1),
    keeps the interrupted run's rows and logs every step once."""
    common = (
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "test_after_fit=false",
        "trainer.check_val_every_n_epoch=1",
    )
    run_cfg(compose_cfg(tmp_path, tiny_overrides(*common)))
    before = metrics_csv(tmp_path / "run")
    assert sorted(int(r["step"]) for r in before if r.get("train/loss")) == [0, 1]
    run_cfg(compose_cfg(tmp_path, tiny_overrides(*common, "trainer.max_epochs=2", "ckpt_path=last")))
    assert [p.name for p in (tmp_path / "run" / "csv").iterdir()] == ["version_0"]
    rows = metrics_csv(tmp_path / "run")
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [0, 1, 2, 3]
    assert [r for r in rows if r.get("val/pq")] and {r["epoch"] for r in rows if r.get("val/pq")} == {"0", "1"}


def _fake_run(log_dir: Path, kind: str, name: str, experiment: str, task: str) -> Path:
    """A run folder as the CLI leaves it: .hydra/hydra.yaml (the choices), config_resolved.yaml, last.ckpt."""
    run = log_dir / kind / "runs" / name
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      experiment: {experiment}\n")
    (run / "config_resolved.yaml").write_text(f"model:\n  task: {task}\n")
    return ckpt


def test_ckpt_path_last_finds_the_newest_run_of_the_same_experiment_and_task(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, ["ckpt_path=last"])
    HydraConfig.instance().set_config(cfg)  # the experiment choice, as the CLI sees it
    with pytest.raises(FileNotFoundError, match="no last.ckpt"):
        resolve_ckpt_path(cfg)
    logs = tmp_path / "logs"
    ckpt = _fake_run(logs, "train", "2026-01-01_00-00-00", "synthetic", "panoptic")
    assert resolve_ckpt_path(cfg) == str(ckpt)
    # newer runs of a debug preset, another experiment or another task are never picked
    _fake_run(logs, "debug", "2026-01-02_00-00-00", "synthetic", "panoptic")
    _fake_run(logs, "train", "2026-01-03_00-00-00", "knet_r50_coco_panoptic_1x", "panoptic")
    _fake_run(logs, "train", "2026-01-04_00-00-00", "synthetic", "instance")
    assert resolve_ckpt_path(cfg) == str(ckpt)
    newer = _fake_run(logs, "train", "2026-01-05_00-00-00", "synthetic", "panoptic")
    assert resolve_ckpt_path(cfg) == str(newer)


def test_class_count_mismatch_fails_before_training(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, tiny_overrides("data.num_things=5", "data.num_classes=8"))
    with pytest.raises(
        ValueError,
        match=r"data.num_things=5 but the data set's categories give 4 \(4 things, 3 "
        r"stuff\); drop data.num_things to take the count from the data set",
    ):
        run_cfg(cfg)


def test_unwritable_output_dir_fails_early(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = compose_cfg(tmp_path, tiny_overrides())
    OmegaConf.update(cfg, "paths.output_dir", str(blocker / "run"))
    with pytest.raises((PermissionError, FileExistsError, NotADirectoryError, OSError)):
        run_cfg(cfg)


def test_wandb_offline_run_writes_its_folder_with_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    cfg = compose_cfg(
        tmp_path,
        tiny_overrides(
            "debug=limit",
            "logger=wandb",
            "trainer.check_val_every_n_epoch=1",
            "logger.wandb.offline=true",
            "+logger.wandb.config.api_key=hunter2",
        ),
    )
    run_cfg(cfg)
    import wandb

    wandb.teardown()  # waits for the W&B service to flush the run file
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    keys = set().union(*(row.keys() for row in run["history"]))
    assert {"train/loss", "val/pq", "test/pq"} <= keys
    assert run["config"]["model"]["num_proposals"] == 6
    assert "hunter2" not in json.dumps(run["config"])
    assert run["tags"] == ["synthetic", "panoptic"]


def test_redact_hides_secrets() -> None:
    cfg = {"logger": {"wandb": {"api_key": "abc", "project": "p"}}, "token": "t", "x": [{"password": "p"}]}
    assert redact(cfg) == {
        "logger": {"wandb": {"api_key": "***", "project": "p"}},
        "token": "***",
        "x": [{"password": "***"}],
    }


@pytest.mark.slow  # test_readme.py runs `python -m knet_lightning` as written in CI
def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    env = dict(os.environ, KNET_ROOT=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "knet_lightning", "--cfg", "job", "model.num_stages=2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "num_stages: 2" in out.stdout


def test_hydra_dump_is_redacted(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("logger:\n  wandb:\n    api_key: hunter2\n    project: p\n")
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        "- +logger.wandb.config.api_key=hunter2\n- model.num_stages=2\n"
    )
    redact_hydra_dump(tmp_path)
    config = (tmp_path / ".hydra" / "config.yaml").read_text()
    overrides = (tmp_path / ".hydra" / "overrides.yaml").read_text()
    assert "hunter2" not in config + overrides
    assert "project: p" in config and "model.num_stages=2" in overrides


def test_results_table_shows_learning_rates_with_significant_digits(capsys: pytest.CaptureFixture) -> None:
    print_results("K-Net", {"lr-AdamW/head": 1e-4, "lr-AdamW/backbone": 2.5e-5, "test/pq": 79.04, "zero": 0.0})
    out = capsys.readouterr().out
    assert "0.0001" in out and "2.5e-05" in out and "79.04" in out and "0.00" in out


def test_secret_overrides_move_to_the_environment() -> None:
    env: dict[str, str] = {}
    argv = hide_secret_overrides(["prog", "+hf_token=hf_abc", "model.num_stages=2", "+logger.wandb.config.api_key=k1",
                                  "+my_password=${oc.env:PW}", "trainer=ddp"], env)  # fmt: skip
    assert argv == [
        "prog",
        "+hf_token=${oc.env:KNET_SECRET_0}",
        "model.num_stages=2",
        "+logger.wandb.config.api_key=${oc.env:KNET_SECRET_1}",
        "+my_password=${oc.env:PW}",
        "trainer=ddp",
    ]
    assert env == {"KNET_SECRET_0": "hf_abc", "KNET_SECRET_1": "k1"}


SECRETS = (
    "hf_SEKRIT_token_0123456789",  # a secret key's override
    "wandbSEKRITkey_abcdef0123456789",  # a secret key's override, nested
    "ghp_SEKRIT0123456789abcdefghijklmnopqrst",  # a token shape under a key no pattern names
    "SEKRITpw_hunter2",  # password=... inside a string
    "hf_SEKRITenv0123456789abcdefghijklmn",  # $HF_TOKEN, read by the config
    "SEKRITservice_pw",  # $MY_SERVICE_PASSWORD, read under a key that does not look secret
    "SEKRITcustom_value",  # a key that secret_keys= names
)


def test_no_secret_reaches_a_file_of_the_run_or_of_wandb(tmp_path: Path) -> None:
    args = [
        "logger=wandb",
        "debug=limit",
        f"+hf_token={SECRETS[0]}",
        f"+logger.wandb.config.api_key={SECRETS[1]}",
        f"+github_pat={SECRETS[2]}",
        f'+notes="password={SECRETS[3]} and more"',  # what a shell passes for '+notes="password=..."'
        "+hub_token=${oc.env:HF_TOKEN}",
        "+service=${oc.env:MY_SERVICE_PASSWORD}",
        "secret_keys=[my_field]",
        f"+my_field={SECRETS[6]}",
        *tiny_overrides(),
    ]
    env = {k: v for k, v in os.environ.items() if k != "KNET_ROOT"}
    env.update(WANDB_MODE="offline", HF_TOKEN=SECRETS[4], MY_SERVICE_PASSWORD=SECRETS[5])
    out = subprocess.run([sys.executable, "-m", "knet_lightning", *args], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.name == ".hydra" for p in files) and any(p.suffix == ".wandb" for p in files)
    leaked = [f"{p}: {secret}" for p in files for secret in SECRETS if secret.encode() in p.read_bytes()]
    assert leaked == []
    (run,) = tmp_path.glob("logs/train/runs/*")
    resolved = OmegaConf.load(run / "config_resolved.yaml")
    for key in ("hf_token", "github_pat", "hub_token", "service", "my_field"):
        assert resolved[key] == "***", key
    assert resolved.notes == "password=*** and more" and list(resolved.secret_keys) == ["my_field"]
    # Hydra recorded where each value went, not the value
    assert "+github_pat=${oc.env:KNET_SECRET_" in (run / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.parametrize("seed", ["abc", "1.5", "true"])
def test_a_bad_seed_names_the_key_before_any_work(tmp_path: Path, seed: str) -> None:
    """``seed`` is typed (RunSettings): a value that is no integer fails at composition, naming it."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=rf"Error merging override seed={seed}") as err:
        compose_cfg(tmp_path, tiny_overrides(f"seed={seed}"))
    assert "could not be converted to Integer" in str(err.value.__cause__)
    assert "full_key: seed" in str(err.value.__cause__)
    assert not (tmp_path / "run" / "config_resolved.yaml").exists()


def test_the_mode_table_runs_every_mode_the_configs_name(tmp_path: Path) -> None:
    """``cli.MODES``: one function per mode, for every ``mode`` value that conf/ sets or documents."""
    from knet_lightning import cli
    from knet_lightning.configs import RunSettings

    named = set()
    for path in CONF.rglob("*.yaml"):
        text = path.read_text()
        named |= set(re.findall(r"^mode:\s*(\w+)", text, flags=re.M))
        for choices in re.findall(r"mode=((?:\w+\|)+\w+)", text):
            named |= set(choices.split("|"))
    named.add(RunSettings().mode)
    assert named == {"train", "eval", "predict", "serve", "convert", "export", "check_data"}
    assert set(cli.MODES) == named
    assert all(callable(fn) and fn.__name__ == f"run_{mode}" for mode, fn in cli.MODES.items())


def test_an_unknown_mode_lists_the_valid_ones_before_any_work(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, tiny_overrides("mode=trian"))
    with pytest.raises(ValueError, match=r"mode='trian': expected one of train, eval, predict, serve, convert, export, "
                                         r"check_data$"):  # fmt: skip
        run_cfg(cfg)
    assert not (tmp_path / "run" / "config_resolved.yaml").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("test_after_fitt=false", r"Could not override 'test_after_fitt'"),
        (
            "max_bad_steps=many",
            r"Value 'many' of type 'str' could not be converted to Integer\n\s*full_key: max_bad_steps",
        ),
        ("predict.batch_sise=2", r"Could not override 'predict.batch_sise'"),
        ("trusted_checkpoint=maybe", r"Value 'maybe' is not a valid bool.*\n\s*full_key: trusted_checkpoint"),
    ],
)
def test_run_settings_refuse_a_misspelled_key_or_a_wrong_type(tmp_path: Path, override: str, message: str) -> None:
    """The top-level keys are typed (RunSettings, registered as ``run_settings`` and first in
    train.yaml's defaults): Hydra refuses a misspelled one or a value of the wrong type, naming it."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(tmp_path, tiny_overrides(override))
    assert re.search(message, f"{err.value}\n{err.value.__cause__}"), f"{err.value}\n{err.value.__cause__}"


def test_a_misspelled_top_level_key_in_a_config_file_fails_at_composition(tmp_path: Path) -> None:
    from hydra.errors import ConfigCompositionException

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\ntest_after_fitt: false\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as err:
            compose(config_name="train", overrides=["experiment=typo"])
    assert "Key 'test_after_fitt' not in 'RunSettings'" in f"{err.value}\n{err.value.__cause__}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_stages=0"], r"model.num_stages=0: expected an integer >= 1 .*panoptic task.*paper uses 3"),
        (["model=knet_instance", "model.num_stages=0"], r"model.num_stages=0: .* the instance task predicts"),
        (["model.num_proposals=0"], r"model.num_proposals=0: expected an integer >= 1"),
        (["model.num_stages=two"], r"model.num_stages='two': expected an integer >= 1"),
    ],
)
def test_a_stage_or_kernel_count_the_task_cannot_evaluate_fails_before_any_work(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    """Issue 27: ``model.num_stages=0`` trained, then the test step failed on stage 0's missing
    classifier (and ``debug=fast_dev_run`` reported ``val/acc nan``); now no data is read."""
    cfg = compose_cfg(tmp_path, [*tiny_overrides("debug=fast_dev_run"), *overrides])
    with pytest.raises(ValueError, match=message):
        run_cfg(cfg)
    assert not (tmp_path / "run" / "config_resolved.yaml").exists() and not (tmp_path / "data").exists()


def test_the_fatal_error_of_a_failed_run_is_in_its_log_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KNET_ROOT"}
    # (a value of the wrong type, seed=abc, fails at composition, before there is a run folder)
    out = subprocess.run([sys.executable, "-m", "knet_lightning", "mode=trian"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)  # fmt: skip
    assert out.returncode != 0 and "expected one of train, eval" in out.stderr
    (log_file,) = tmp_path.glob("logs/trian/runs/*/trian.log")
    text = log_file.read_text()
    assert "run failed: ValueError: mode='trian': expected one of train, eval" in text and "run folder:" in text


def test_a_bad_postprocess_setting_fails_before_the_first_step(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, tiny_overrides("model.postprocess.method=fastest"))
    with pytest.raises(Exception, match="method='fastest'"):
        run_cfg(cfg)
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "run" / "csv").exists()


def test_wandb_api_key_in_the_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, tiny_overrides("logger=wandb", "+logger.wandb.api_key=abc"))
    with pytest.raises(ValueError, match=r"logger.wandb.api_key: .*`wandb login`.*WANDB_API_KEY"):
        run_cfg(cfg)


def test_predict_inputs_errors_name_the_file(tmp_path: Path) -> None:
    from knet_lightning.data.meta import DatasetError
    from knet_lightning.inference.predict import collect_inputs
    from knet_lightning.inference.segmenter import read_input

    with pytest.raises(DatasetError, match="no such image file, folder, glob match or .txt list"):
        collect_inputs(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no images"):
        collect_inputs(tmp_path)
    with pytest.raises(DatasetError, match="the pattern matches no image"):
        collect_inputs(tmp_path / "*.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot decode image file"):
        read_input(collect_inputs(tmp_path)[0].path, 0)
    # outputs are named by path without suffix: a clash is an error before anything is written
    (tmp_path / "broken.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"broken\.jpg and broken\.png would write the same output file"):
        collect_inputs(tmp_path)
    empty = tmp_path / "list.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(DatasetError, match=r"list\.txt: the list names no image"):
        collect_inputs(empty)


def test_the_defaults_train_yaml_shows_are_run_settings_defaults() -> None:
    """conf/train.yaml explains the top-level keys and shows each default as a `# key: value`
    line; RunSettings holds them. The shown values may not drift from the typed ones."""
    import re

    import yaml
    from omegaconf import OmegaConf

    from knet_lightning.cli import config_dir
    from knet_lightning.configs import RunSettings

    typed = OmegaConf.to_container(OmegaConf.structured(RunSettings), resolve=False)
    shown = {}
    for line in (Path(config_dir()) / "train.yaml").read_text().splitlines():
        m = re.match(r"^# ([a-z_]+): (.*)$", line)
        if m and m[1] in typed:
            shown[m[1]] = yaml.safe_load(m[2]) if not m[2].startswith("${") else m[2]
    assert len(shown) >= 20, sorted(shown)
    assert {k: typed[k] for k in shown} == shown
