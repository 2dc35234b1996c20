"""Reading a backbone's local weights file (``model.net.weights_path``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def read_weights_file(weights_path: str | Path) -> Any:
    """The object a ``.pth`` holds, read weights-only on the CPU; a missing or unreadable file is
    an error naming it as ``backbone weights_path``."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights_path {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors come in many types
        raise RuntimeError(f"backbone weights_path {str(path)!r} is not a loadable torch state dict: {err}") from err
