"""Redaction by key and by value (knet_lightning/runtime/secrets.py): environment values, token shapes,
``key=value`` inside strings, ``secret_keys=``; and what must stay readable (git commit hashes,
every key of the project's configs). The end-to-end check that no file of a run holds a secret is
``test_no_secret_reaches_a_file_of_the_run_or_of_wandb`` in test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_utils import compose_cfg
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from knet_lightning.cli import config_dir
from knet_lightning.runtime.secrets import (
    hide_secret_overrides,
    is_secret_key,
    redact,
    redact_hydra_dump,
    redact_text,
    secret_keys_from_argv,
)

SHA = "0123456789abcdef0123456789abcdef01234567"  # a git commit: 40 hex, like a W&B API key

TOKENS = {
    "github classic": "ghp_" + "A1b2C3d4E5" * 3 + "f6G7h8",
    "github oauth": "gho_" + "x" * 36,
    "github user-to-server": "ghu_" + "Y9" * 18,
    "github server": "ghs_" + "z" * 36,
    "github refresh": "ghr_" + "0a" * 18,
    "github fine-grained": "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVW",
    "hugging face": "hf_" + "AbCdEfGhIj" * 3 + "Kl",
    "openai": "sk-" + "T3BlbkFJ" * 6,
    "openai project": "sk-proj-" + "a1_B2-c3" * 10,
    "aws access key id": "AKIA" + "IOSFODNN7EXAMPLE",
    "aws temporary key id": "ASIA" + "Z" * 16,
}


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_a_token_shape_is_masked_wherever_it_appears(name: str) -> None:
    token = TOKENS[name]
    assert redact_text(f"pushed with {token}, then", environ={}) == "pushed with ***, then"
    assert redact({"notes": token, "runs": [f"x {token}"]}, environ={}) == {"notes": "***", "runs": ["x ***"]}


def test_a_git_commit_hash_is_not_masked() -> None:
    # the run records commits (W&B's metadata, reproduction notes): a bare 40-hex string stays
    cfg = {"git": {"commit": SHA}, "notes": f"trained at {SHA}"}
    assert redact(cfg, environ={}) == cfg
    assert redact_text(f"commit {SHA}", environ={}) == f"commit {SHA}"
    # ... and is masked where it is a W&B key: under a secret key, or as $WANDB_API_KEY
    assert redact({"api_key": SHA}, environ={}) == {"api_key": "***"}
    assert redact_text(f"WANDB_API_KEY={SHA}", environ={}) == "WANDB_API_KEY=***"
    assert redact_text(f"key {SHA}", environ={"WANDB_API_KEY": SHA}) == "key ***"


def test_the_values_of_secret_environment_variables_are_masked(tmp_path: Path) -> None:
    env = {
        "HF_TOKEN": "hf_plain_but_secret",
        "GITHUB_TOKEN": "gh-token-value",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "MY_PASSWORD": "correct horse",
        "WANDB_API_KEY": SHA,
        "TOKENIZERS_PARALLELISM": "false",  # short: "false" is not masked everywhere
        "MY_AUTH": "1",
        "SSH_AUTH_SOCK": str(tmp_path),  # an existing path names a file, it is no secret
        "HOME_DIR": "correct horse battery",  # not a secret name
    }
    text = (
        f"a {env['HF_TOKEN']} b {env['AWS_SECRET_ACCESS_KEY']} c {env['MY_PASSWORD']} d {SHA} e {env['GITHUB_TOKEN']}"
    )
    assert redact_text(text, environ=env) == "a *** b *** c *** d *** e ***"
    kept = f"false 1 {tmp_path}"
    assert redact_text(kept, environ=env) == kept
    assert redact({"url": f"s3://b?k={env['MY_PASSWORD']}"}, environ=env) == {"url": "s3://b?k=***"}


@pytest.mark.parametrize(
    "text,masked",
    [
        ("password=hunter2 and more", "password=*** and more"),
        ("db password: hunter2, user: me", "db password: ***, user: me"),
        ('{"api_key": "abc123", "project": "p"}', '{"api_key": "***", "project": "p"}'),
        ("url=https://host/x?access_token=abc&page=2", "url=https://host/x?access_token=***&page=2"),
        ("+github_pat=abc,model.num_stages=2", "+github_pat=***,model.num_stages=2"),
        ("passwd = hunter2", "passwd = ***"),
        # an interpolation names a variable, not the value
        ("token=${oc.env:HF_TOKEN}", "token=${oc.env:HF_TOKEN}"),
        ("path=/data/x patience=3 author=me", "path=/data/x patience=3 author=me"),
    ],
)
def test_a_secret_key_value_pair_inside_a_string_is_masked(text: str, masked: str) -> None:
    assert redact_text(text, environ={}) == masked
    assert redact({"notes": text}, environ={}) == {"notes": masked}


def test_secret_looking_key_names() -> None:
    secret = ["api_key", "apiKey", "hf_token", "client_secret", "password", "db_passwd", "passphrase",
              "credentials", "aws_credential", "private_key", "access_key", "authorization", "auth",
              "auth_header", "basic-auth", "github_pat", "GH_PAT", "logger.wandb.config.api_key"]  # fmt: skip
    plain = ["path", "ckpt_path", "weights_path", "dirpath", "patience", "pattern", "patch_size", "author",
             "oauthor", "no_decay_keys", "key", "keys", "num_proposals", "secret_keys"]  # fmt: skip
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in plain if is_secret_key(k)] == []


def test_redact_masks_whole_values_of_secret_keys_but_not_flags_or_interpolations() -> None:
    cfg = {"auth": {"user": "me"}, "use_auth": True, "token": None, "pat": "", "api_key": "${oc.env:K}", "n": 3}
    assert redact(cfg, environ={}) == {**cfg, "auth": "***"}


def test_secret_keys_names_more_keys() -> None:
    cfg = {"my_field": "v1", "svc": {"dsn_string": "v2", "host": "h"}, "other": "v3", "secret_keys": ["my_field"]}
    assert redact(cfg, environ={}) == cfg
    assert redact(cfg, ["my_field", "^dsn_"], environ={}) == {
        **cfg,
        "my_field": "***",
        "svc": {"dsn_string": "***", "host": "h"},
    }
    # the pattern also reads key=value inside strings and environment variable names
    assert redact_text("my_field=v1 other=v3", "my_field", environ={}) == "my_field=*** other=v3"
    assert redact_text("x some-long-value", ["my_field"], environ={"MY_FIELD": "some-long-value"}) == "x ***"
    with pytest.raises(ValueError, match=r"secret_keys: '\(' is not a regular expression"):
        redact({}, ["("], environ={})


def test_secret_keys_are_read_from_the_command_line() -> None:
    assert secret_keys_from_argv(["model.num_stages=2"]) == []
    assert secret_keys_from_argv(["secret_keys=[my_field,'^dsn$']"]) == ["my_field", "^dsn$"]
    assert secret_keys_from_argv(["++secret_keys=one", "secret_keys=[two]"]) == ["two"]
    with pytest.raises(ValueError, match="secret_keys"):
        secret_keys_from_argv(["secret_keys=['(']"])


def test_overrides_with_secret_values_or_custom_keys_move_to_the_environment() -> None:
    env = {"HF_TOKEN": "hf_plain_but_secret"}
    argv = hide_secret_overrides(
        ["prog", f"+hub={TOKENS['github classic']}", '+notes="password=hunter2 and more"', "secret_keys=[my_field]",
         "+my_field=plain", "+copy=hf_plain_but_secret", "+hub_token=${oc.env:HF_TOKEN}", f"+commit={SHA}",
         "+notes2=password and more", "model.num_stages=2"],
        env,
    )  # fmt: skip
    assert argv == [
        "prog",
        "+hub=${oc.env:KNET_SECRET_0}",
        "+notes=${oc.env:KNET_SECRET_1}",
        "secret_keys=[my_field]",
        "+my_field=${oc.env:KNET_SECRET_2}",
        "+copy=${oc.env:KNET_SECRET_3}",
        "+hub_token=${oc.env:HF_TOKEN}",
        f"+commit={SHA}",
        "+notes2=password and more",
        "model.num_stages=2",
    ]
    # the variable holds the string Hydra would have read: without the quotes of the command line
    assert env == {
        "HF_TOKEN": "hf_plain_but_secret",
        "KNET_SECRET_0": TOKENS["github classic"],
        "KNET_SECRET_1": "password=hunter2 and more",
        "KNET_SECRET_2": "plain",
        "KNET_SECRET_3": "hf_plain_but_secret",
    }


def test_the_hydra_dump_is_masked_by_value_and_left_alone_without_secrets(tmp_path: Path) -> None:
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    overrides = '- +notes="password=hunter2 and more"\n- +hub_token=${oc.env:HF_TOKEN}\n- +my_field=v1\n'
    (hydra_dir / "overrides.yaml").write_text(overrides)
    plain = "model:\n  num_stages: 2  # kept byte for byte\n"
    (hydra_dir / "config.yaml").write_text(plain)
    (hydra_dir / "hydra.yaml").write_text(f"hydra:\n  job:\n    override_dirname: +x={TOKENS['hugging face']},y=2\n")
    redact_hydra_dump(tmp_path, ["my_field"])
    assert OmegaConf.load(hydra_dir / "overrides.yaml") == [
        '+notes="password=*** and more"',
        "+hub_token=${oc.env:HF_TOKEN}",
        "+my_field=***",
    ]
    assert (hydra_dir / "config.yaml").read_text() == plain
    assert OmegaConf.load(hydra_dir / "hydra.yaml").hydra.job.override_dirname == "+x=***,y=2"


def _experiments() -> list[str | None]:
    return [None, *sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))]


@pytest.mark.parametrize("config_name", ["train", "eval", "predict"])
def test_no_key_of_the_project_configs_is_masked(tmp_path: Path, config_name: str) -> None:
    # every experiment composes on train.yaml; eval and predict set their mode only
    for experiment in _experiments() if config_name == "train" else [None]:
        cfg = compose_cfg(tmp_path, [] if experiment is None else [f"experiment={experiment}"], config_name)
        HydraConfig.instance().set_config(cfg)
        try:
            hydra_node = OmegaConf.to_container(cfg.hydra, resolve=False)
            container = OmegaConf.to_container(cfg, resolve=True)
        finally:
            GlobalHydra.instance().clear()
        container.pop("hydra")
        assert redact(container, container["secret_keys"], environ={}) == container, experiment
        assert redact(hydra_node, environ={}) == hydra_node, experiment
