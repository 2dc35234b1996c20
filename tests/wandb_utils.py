"""Reads the records of an offline W&B run (``run-*.wandb``) without any network.

The file is wandb's record log: a 7-byte header, then 32 KiB blocks of LevelDB-style
chunks (crc32, length, type), each record a protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _LAST = 1, 4


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path}: not a W&B run file")
    pos, out, buf = _CHUNK_HEADER, [], b""
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        pos += _CHUNK_HEADER
        if length == 0 and kind == 0:
            break
        buf += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            out.append(buf)
            buf = b""
    return out


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """``{"group", "tags", "config" (dict), "history" (list of dicts)}`` of an offline run folder."""
    (path,) = list(Path(run_dir).glob("*.wandb"))
    result: dict[str, Any] = {"group": None, "tags": [], "config": {}, "history": []}
    for raw in _records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            result["group"] = rec.run.run_group
            result["tags"] = list(rec.run.tags)
            for item in rec.run.config.update:
                result["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                key = item.key or "/".join(item.nested_key)
                result["config"][key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            result["history"].append(row)
    return result
