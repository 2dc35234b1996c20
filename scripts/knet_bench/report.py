"""Markdown rendering of the results: one table (or a few) per section, in the order the JSON
holds them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .common import INFER_PARTS, TRAIN_PARTS


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table: ``columns`` are ``(key, header)``; a missing value prints ``-``."""
    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def render_section(name: str, data: dict[str, Any]) -> str:
    """The Markdown of one section's results."""
    out = [f"## {name}", ""]
    status = data.get("status", "ok")
    if status != "ok":
        out.append(f"**{status}**: {data.get('reason', '')}")
        return "\n".join(out) + "\n"
    rows = data.get("rows", [])
    if name == "knet":
        m = data["model"]
        out.append(
            f"{m['backbone']}, N={m['num_proposals']}, S={m['num_stages']}, {m['num_classes']} classes, "
            f"{m['params'] / 1e6:.1f} M params ({m['trainable_params'] / 1e6:.1f} M trainable)\n"
        )
        out.append(
            markdown_table(
                rows,
                [
                    ("size", "size"),
                    ("batch", "batch"),
                    ("mode", "mode"),
                    ("total_ms", "median ms"),
                    ("min_ms", "min ms"),
                    ("images_per_s", "img/s"),
                    ("peak_mb", "peak MB"),
                    ("delta_mb", "delta MB"),
                ],
            )
        )
        for mode, order in (("inference", INFER_PARTS), ("train", TRAIN_PARTS)):
            sub = [{**r, **r["parts_ms"]} for r in rows if r["mode"] == mode]
            out += ["", f"Breakdown ({mode}, ms, of the median run):", ""]
            cols = [("size", "size"), ("batch", "batch"), ("breakdown_total_ms", "total")] + [(k, k) for k in order]
            out.append(markdown_table(sub, cols))
        if data.get("postprocess"):
            out += ["", "Panoptic post-processing of one image by merge method (ms):", ""]
            out.append(
                markdown_table(
                    data["postprocess"],
                    [("size", "size"), ("outputs", "outputs"), ("method", "method"), ("ms", "median ms")],
                )
            )
    elif name == "scaling":
        out.append(f"Input {data['size']}, batch 1\n")
        out.append(
            markdown_table(
                rows,
                [
                    ("num_proposals", "N"),
                    ("num_stages", "S"),
                    ("params_m", "params (M)"),
                    ("gflops", "GFLOPs"),
                    ("infer_ms", "inference ms"),
                    ("train_ms", "train step ms"),
                ],
            )
        )
    elif name == "eval":
        out.append(
            markdown_table(
                rows,
                [
                    ("metric", "metric"),
                    ("images", "images"),
                    ("update_ms_per_image", "update ms/img"),
                    ("compute_ms", "compute ms"),
                    ("images_per_s", "img/s"),
                ],
            )
        )
    elif name == "data":
        out.append(
            markdown_table(
                rows,
                [
                    ("pipeline", "pipeline"),
                    ("samples", "samples"),
                    ("median_ms", "median ms"),
                    ("mean_ms", "mean ms"),
                    ("samples_per_s_per_worker", "samples/s/worker"),
                ],
            )
        )
    elif name == "mask2former":
        out.append(
            markdown_table(
                rows,
                [
                    ("size", "size"),
                    ("batch", "batch"),
                    ("mode", "mode"),
                    ("knet_ms", "K-Net ms"),
                    ("m2f_ms", "M2F ms"),
                    ("ratio_knet_over_m2f", "K-Net / M2F"),
                    ("m2f_peak_mb", "M2F peak MB"),
                    ("m2f_delta_mb", "M2F delta MB"),
                ],
            )
        )
    elif name == "zoo":
        out.append(
            markdown_table(
                rows,
                [
                    ("model", "model"),
                    ("size", "size"),
                    ("params_m", "params (M)"),
                    ("gflops", "GFLOPs"),
                    ("infer_ms", "inference ms"),
                    ("forward_ms", "forward ms"),
                    ("gflops_per_s", "GFLOP/s"),
                    ("fraction_of_matmul", "of matmul"),
                    ("train_ms", "train step ms"),
                    ("infer_peak_mb", "inference peak MB"),
                    ("train_peak_mb", "train peak MB"),
                    ("note", "note"),
                ],
            )
        )
    if data.get("notes"):
        out.append("")
        out += [f"- {note}" for note in data["notes"]]
    out.append(f"\n_section time: {data.get('seconds', 0.0):.1f} s_")
    return "\n".join(out) + "\n"
