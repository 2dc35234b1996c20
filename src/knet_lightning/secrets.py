"""Secret-looking settings (API keys, tokens, passwords) never reach a file of a run.

A key is secret-looking when it matches :data:`SECRET_KEY`. Three places could write one:

* Hydra records the command line in ``.hydra/`` (``overrides.yaml``, ``hydra.yaml``'s
  ``overrides.task`` and ``override_dirname``) before the job starts, and W&B records it in its
  run metadata. :func:`hide_secret_overrides` therefore moves the value of every secret-looking
  override into an environment variable of this process before Hydra parses the command line,
  and leaves ``${oc.env:KNET_SECRET_<i>}`` in its place: the config still resolves to the value,
  DDP ranks started from the recorded command inherit the variable, and no file holds it.
* ``config_resolved.yaml``, the loggers' hyperparameters and the W&B config get :func:`redact`.
* A secret written into a YAML file of ``conf/`` reaches ``.hydra/config.yaml``:
  :func:`redact_hydra_dump` rewrites it there.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
ENV_PREFIX = "KNET_SECRET_"
MASK = "***"

# key=value of a Hydra override, with its +, ++ or ~ prefix
_OVERRIDE = re.compile(r"^(?P<prefix>[+~]*)(?P<key>[\w.\-/@]+)=(?P<value>.*)$", re.S)
# a `key: value` line of a YAML dump (or `- key=value` list item) whose key looks secret
_YAML_LINE = re.compile(rf"(?im)^(\s*-?\s*[+~]*[\w.]*(?:{SECRET_KEY.pattern})[\w.]*\s*[:=]\s*)(?!'\*\*\*')(\S.*)$")


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def hide_secret_overrides(argv: Sequence[str], environ: MutableMapping[str, str]) -> list[str]:
    """``argv`` with each secret-looking override's value moved into ``environ``.

    ``+hf_token=abc`` becomes ``+hf_token=${oc.env:KNET_SECRET_0}`` with ``KNET_SECRET_0=abc``;
    an interpolation (``${...}``) or an empty value is left alone. ``argv[0]`` is the program.
    """
    out = list(argv[:1])
    for arg in argv[1:]:
        m = _OVERRIDE.match(arg)
        if m and is_secret_key(m["key"]) and m["value"] and not m["value"].startswith("${"):
            name = f"{ENV_PREFIX}{sum(k.startswith(ENV_PREFIX) for k in environ)}"
            environ[name] = m["value"]
            arg = f"{m['prefix']}{m['key']}=${{oc.env:{name}}}"
        out.append(arg)
    return out


def redact(obj: Any) -> Any:
    """A copy of a plain config container with secret-looking values replaced by ``***``."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def redact_hydra_dump(output_dir: Path) -> None:
    """Rewrites secret-looking values in the ``.hydra/`` files Hydra wrote before the job."""
    hydra_dir = Path(output_dir) / ".hydra"
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        path = hydra_dir / name
        if not path.is_file():
            continue
        text = path.read_text()
        # an oc.env interpolation names a variable, not the value: keep it readable
        cleaned = _YAML_LINE.sub(lambda m: m[0] if "${oc.env:" in m[2] else f"{m[1]}'{MASK}'", text)
        if cleaned != text:
            path.write_text(cleaned)
