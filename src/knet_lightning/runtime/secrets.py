"""Secret-looking settings (API keys, tokens, passwords) never reach a file of a run.

What is secret, by key and by value:

* a key that matches :data:`SECRET_KEY` (api_key, token, secret, password, passwd, passphrase,
  credential(s), private_key, access_key, authorization, and ``pat`` or ``auth`` as a word of the
  key: ``github_pat`` and ``auth_header``, not ``path``, ``patience`` or ``author``), or one of the
  run's ``secret_keys`` (names or regular expressions, matched against the key and each of its
  dotted parts); the key ``secret_keys`` itself lists names, not secrets;
* a known token shape anywhere in a string (:data:`TOKEN_SHAPES`: GitHub, Hugging Face,
  OpenAI-style ``sk-``, AWS access key ids);
* the value of a secret-looking key written inside a string: ``notes="password=hunter2 and more"``
  keeps ``password=*** and more``;
* the value of an environment variable whose name looks secret (``HF_TOKEN``, ``WANDB_API_KEY``,
  ``AWS_SECRET_ACCESS_KEY``, ...) wherever it appears, when it has at least
  :data:`MIN_ENV_VALUE` characters (``1`` or ``true`` would mask every mention) and is not a path
  that exists (``SSH_AUTH_SOCK``, ``GOOGLE_APPLICATION_CREDENTIALS`` name files, and masking
  them would hide where things are, not a secret).

A bare 40-hex string is not a token shape, although W&B API keys have that shape: git commit
hashes have it too, and W&B records the run's commit. A W&B key is masked where it is the value
of a secret-looking key (``WANDB_API_KEY``, ``api_key=...``), which is where it comes from.

Three places could write a secret:

* Hydra records the command line in ``.hydra/`` (``overrides.yaml``, ``hydra.yaml``'s
  ``overrides.task`` and ``override_dirname``) before the job starts, and W&B records it in its
  run metadata. :func:`hide_secret_overrides` therefore moves the value of every override with a
  secret-looking key or value into an environment variable of this process before Hydra parses
  the command line, and leaves ``${oc.env:KNET_SECRET_<i>}`` in its place: the config still
  resolves to the value, DDP ranks started from the recorded command inherit the variable, and no
  file holds it. It reads ``secret_keys=`` from the same command line, as Hydra has not run yet.
* ``config_resolved.yaml``, the loggers' hyperparameters and the W&B config get :func:`redact`.
* A secret written into a YAML file of ``conf/`` reaches ``.hydra/config.yaml``:
  :func:`redact_hydra_dump` rewrites it there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(
    r"api[_-]?key|token|secret|passw(?:or)?d|passphrase|credential|private[_-]?key|access[_-]?key"
    r"|authorization|(?<![a-z0-9])(?:pat|auth)(?![a-z0-9])",
    re.IGNORECASE,
)
# the option that names more secret keys: its value is a list of names, not a secret
SECRET_KEYS_OPTION = "secret_keys"
TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"gh[opusr]_[A-Za-z0-9]{36,}"  # GitHub classic tokens
    r"|github_pat_[A-Za-z0-9_]{22,}"  # GitHub fine-grained tokens
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|sk-[A-Za-z0-9_\-]{32,}"  # OpenAI-style: sk-..., sk-proj-...
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}"  # AWS access key ids
    r")(?![A-Za-z0-9])"
)
ENV_PREFIX = "KNET_SECRET_"
MASK = "***"
MIN_ENV_VALUE = 8

# key=value of a Hydra override, with its +, ++ or ~ prefix
_OVERRIDE = re.compile(r"^(?P<prefix>[+~]*)(?P<key>[\w.\-/@]+)=(?P<value>.*)$", re.S)
# `key=value`, `key: value`, `"key": "value"` inside a string; the value ends at a space, quote or
# separator. A value that does not belong to a secret key is searched again (`url=...?token=...`)
_KEY_VALUE = re.compile(
    r"(?<![\w.\-])(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"',;&)}\]]+)"
)


def _extra_patterns(extra_keys: Iterable[str] | str | None) -> list[re.Pattern[str]]:
    """``secret_keys`` compiled, case-insensitive like :data:`SECRET_KEY` (``MY_FIELD`` in the
    environment is ``my_field``); a bad expression is an error naming the option, not a key that
    silently stays readable."""
    if not extra_keys:
        return []
    if isinstance(extra_keys, str):
        extra_keys = [extra_keys]
    patterns = []
    for key in extra_keys:
        try:
            patterns.append(re.compile(str(key), re.IGNORECASE))
        except re.error as err:
            raise ValueError(f"{SECRET_KEYS_OPTION}: {key!r} is not a regular expression ({err})") from None
    return patterns


class Redactor:
    """The secret-looking keys and values of one run: built once per container or file, as it
    reads the environment."""

    def __init__(self, extra_keys: Iterable[str] | str | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.extra = _extra_patterns(extra_keys)
        environ = os.environ if environ is None else environ
        values = {
            v for k, v in environ.items() if len(v) >= MIN_ENV_VALUE and self.is_secret_key(k) and not _is_path(v)
        }
        # the longest first, so that a value containing another is masked whole
        self.env_values = (
            re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))) if values else None
        )

    def is_secret_key(self, key: str) -> bool:
        """Whether a key, dotted path or environment variable name looks secret. A user's
        pattern is also tried on each dotted part, so that ``^my_field$`` finds ``+a.my_field``."""
        key = str(key).lstrip("+~")
        if key.split(".")[-1] == SECRET_KEYS_OPTION:
            return False
        if SECRET_KEY.search(key):
            return True
        parts = [key, *re.split(r"[./@]", key)]
        return any(p.search(part) for p in self.extra for part in parts)

    def text(self, text: str) -> str:
        """``text`` with token shapes, secret-key values and secret environment values masked;
        an interpolation (``${...}``) names a variable, not its value, and is kept."""
        text = TOKEN_SHAPES.sub(MASK, text)
        text = _KEY_VALUE.sub(self._key_value, text)
        return self.env_values.sub(MASK, text) if self.env_values else text

    def _key_value(self, m: re.Match[str]) -> str:
        value = m["value"]
        if self.is_secret_key(m["key"]):
            return m[0] if value.startswith("${") else f"{m['key']}{m['sep']}{MASK}"
        return f"{m['key']}{m['sep']}{_KEY_VALUE.sub(self._key_value, value)}"

    def container(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: self._entry(k, v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.container(v) for v in obj]
        if isinstance(obj, str):
            return self.text(obj)
        return obj

    def _entry(self, key: Any, value: Any) -> Any:
        # a flag (`use_auth: true`) or an unset or empty value holds no secret
        if self.is_secret_key(str(key)) and value not in (None, "", [], {}) and not isinstance(value, bool):
            if not _is_interpolation(value):
                return MASK
        return self.container(value)


def _is_path(value: str) -> bool:
    try:
        return os.path.exists(value)
    except (OSError, ValueError):  # too long a name, a NUL byte: not a path
        return False


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${") and value.endswith("}")


def is_secret_key(key: str, extra_keys: Iterable[str] | str | None = None) -> bool:
    """Whether ``key`` (a name or dotted path) looks secret, ``extra_keys`` included."""
    return Redactor(extra_keys, environ={}).is_secret_key(key)


def redact_text(
    text: str, extra_keys: Iterable[str] | str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """``text`` with every secret-looking value replaced by ``***`` (see the module's docstring)."""
    return Redactor(extra_keys, environ).text(text)


def redact(obj: Any, extra_keys: Iterable[str] | str | None = None, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of a plain config container with secret-looking values replaced by ``***``: the
    whole value of a secret-looking key, the secret parts of every other string."""
    return Redactor(extra_keys, environ).container(obj)


_UNPARSED = object()


def _override_value(arg: str) -> Any:
    """The value Hydra's override parser gives ``arg`` (quoting removed, lists as lists), or
    :data:`_UNPARSED` where it cannot parse it: Hydra reports a malformed override itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(arg).value()
    except Exception:
        return _UNPARSED


def secret_keys_from_argv(argv: Sequence[str]) -> list[str]:
    """The ``secret_keys=`` of a command line (the last one wins, as in Hydra), read before Hydra
    parses it; an unparsable one is left for Hydra to report."""
    keys: list[str] = []
    for arg in argv:
        m = _OVERRIDE.match(arg)
        if not (m and m["key"] == SECRET_KEYS_OPTION):
            continue
        value = _override_value(arg)
        if value is _UNPARSED:
            continue
        if isinstance(value, str):
            value = [value]
        keys = [str(v) for v in value] if isinstance(value, list) else []
    _extra_patterns(keys)  # a bad regex fails here, before the run
    return keys


def _parsed_value(arg: str, raw: str) -> str:
    """The string an override's value stands for (Hydra's quoting removed); the text as written
    for anything else (a number, a list, a sweep, an override Hydra cannot parse)."""
    value = _override_value(arg)
    return value if isinstance(value, str) else raw


def hide_secret_overrides(argv: Sequence[str], environ: MutableMapping[str, str]) -> list[str]:
    """``argv`` with the value of each override whose key or value looks secret moved into
    ``environ``.

    ``+hf_token=abc`` becomes ``+hf_token=${oc.env:KNET_SECRET_0}`` with ``KNET_SECRET_0=abc``,
    and so do ``+x=ghp_...`` (a token shape), ``'+notes="password=abc and more"'`` (a secret key
    inside the value; the variable holds the string without Hydra's quotes) and ``+x=<value of
    $HF_TOKEN>``. An interpolation (``${...}``) or an empty value is left alone. ``argv[0]`` is the
    program.
    """
    redactor = Redactor(secret_keys_from_argv(argv[1:]), environ)
    out = list(argv[:1])
    for arg in argv[1:]:
        m = _OVERRIDE.match(arg)
        value = m["value"] if m else ""
        if (
            m
            and value
            and not value.startswith("${")
            and (redactor.is_secret_key(m["key"]) or redactor.text(value) != value)
        ):
            name = f"{ENV_PREFIX}{sum(k.startswith(ENV_PREFIX) for k in environ)}"
            environ[name] = _parsed_value(arg, value)
            arg = f"{m['prefix']}{m['key']}=${{oc.env:{name}}}"
        out.append(arg)
    return out


def redact_hydra_dump(output_dir: Path, extra_keys: Iterable[str] | str | None = None) -> None:
    """Rewrites secret-looking values in the ``.hydra/`` files Hydra wrote before the job; a file
    without any is left as Hydra wrote it."""
    from omegaconf import OmegaConf

    redactor = Redactor(extra_keys)
    hydra_dir = Path(output_dir) / ".hydra"
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        path = hydra_dir / name
        if not path.is_file():
            continue
        # unresolved: interpolations stay as Hydra wrote them
        container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        cleaned = redactor.container(container)
        if cleaned != container:
            OmegaConf.save(OmegaConf.create(cleaned), path)
