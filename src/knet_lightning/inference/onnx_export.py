"""A trained K-Net as one ONNX file (``mode=export``), and a checkpoint run by ONNX Runtime.

:func:`export_onnx` rebuilds the network of a checkpoint as
:meth:`~knet_lightning.Segmenter.from_checkpoint` does
(:func:`~knet_lightning.checkpoint.rebuild.rebuild_module`) and exports the fp32 network of one
stage (K-Net, Zhang et al., NeurIPS 2021: the masks and classes of update stage ``s``; the
official code's test path reads the last one). The graph takes one input and has dynamic batch,
height and width::

    images       (B, 3, H, W)  float32, normalised; H and W multiples of the size divisor (32),
                               any size for the semantic task (it reads images unpadded)
    mask_logits  (B, N, H/4, W/4)
    cls_logits   (B, N, C)     panoptic and instance only (the semantic task has no classifier)

Everything post-processing needs is in the file's ``metadata_props`` (JSON strings), so that the
``.onnx`` file alone suffices: the checkpoint's model config (``knet_model_config``), its
test-time preprocessing (``knet_inference``), the class names, thing flags and colours, the task
with its post-processing settings, and the exported stage.
:class:`~knet_lightning.inference.onnx_runtime.OnnxRuntimeNetwork` reads them back; ``Segmenter.from_checkpoint("model.onnx", backend="onnxruntime")`` runs it with the
same reading, transforms and post-processing (``task.predict``) as the PyTorch backend.

The exporter is ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript): shapes are
symbolic there, so a shape-dependent branch is a checked guard rather than a constant silently
baked in by tracing (the TorchScript exporter, deprecated since PyTorch 2.9).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from knet_lightning.checkpoint import rebuild as checkpoint_rebuild
from knet_lightning.checkpoint.keys import INFERENCE_KEY, MODEL_CONFIG_KEY
from knet_lightning.inference.onnx_runtime import (
    CLASSES_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    INPUT_NAME,
    STAGE_KEY,
    TASK_KEY,
    OnnxRuntimeNetwork,
)

__all__ = ["export_onnx", "onnxruntime_network"]

log = logging.getLogger(__name__)

# a gross mismatch between ONNX Runtime and PyTorch at export: a broken graph, not float rounding
# (the tests see <= 3e-6 of max|logit|)
_EXPORT_CHECK_TOL = 1e-3


class _StageNetwork(nn.Module):
    """The network's outputs of one stage, as a tuple of tensors (what ONNX outputs are).

    ``images (B, 3, H, W)`` -> ``(mask_logits (B, N, H/4, W/4),)`` or with ``cls_logits (B, N, C)``.
    """

    def __init__(self, net: nn.Module, stage: int) -> None:
        super().__init__()
        self.net = net
        self.stage = stage

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.net(images)[self.stage]
        return (out.mask_logits,) if out.cls_logits is None else (out.mask_logits, out.cls_logits)


# the exporter's optimizer passes log every rewrite, folding and deduplication at INFO (about
# 100 lines for one K-Net, through the root logger a Hydra app sets to INFO): nothing a user acts
# on. Their warnings and errors still show.
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


@contextlib.contextmanager
def _exporter_logs_at_warning() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _relative_diff(ref: Tensor, got: Tensor) -> float:
    """max |ref - got| / max |ref|: the parity measure of the tests and of the export check."""
    return float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))


def export_onnx(
    checkpoint: str | Path, out_path: str | Path, stage: int = -1, opset: int | None = None,
    trusted: bool = False, config: Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
    mode: str = "export",
) -> Path:  # fmt: skip
    """Export the network of ``checkpoint`` (a training run's or ``mode=convert``'s) to ONNX.

    Args:
        checkpoint: the ``.ckpt`` file; it must carry ``knet_model_config``.
        out_path: the ``.onnx`` file to write (its folder is created).
        stage: the stage whose outputs the graph returns (-1: the last, as evaluation reads it).
        opset: the ONNX opset (None: the exporter's default; 18 or newer, the opsets of its
            operator library).
        trusted: load the checkpoint with full pickle (only for files you trust).
        config / overrides / mode: a run's resolved ``model`` config and its command line: what
            they may change of the checkpoint's model (post-processing, ...), checked before the
            export (:func:`~knet_lightning.checkpoint.rebuild.rebuild_module`); None: the checkpoint's.

    Returns:
        ``out_path``. The graph maps ``images (B, 3, H, W)`` to ``mask_logits (B, N, H/4, W/4)``
        (and ``cls_logits (B, N, C)`` for panoptic/instance) with B, H and W dynamic, fp32.

    Raises:
        ValueError: the checkpoint has no model config (named in the message) or ``stage`` is
            out of range. RuntimeError: the exporter failed, or ONNX Runtime disagrees with
            PyTorch on a check input of another batch and size (the file is removed).
    """
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    module, settings, stage_index = _network_to_export(checkpoint, stage, trusted, config, overrides, mode)
    # the fp32, contiguous (NCHW) network in eval mode: KNetModule.forward may switch to
    # channels-last, a layout choice of oneDNN that ONNX has no notion of
    net = module.net.eval().to(memory_format=torch.contiguous_format)
    wrapper = _StageNetwork(net, stage_index).eval()
    divisor = int(settings["size_divisor"])
    program, names = _exported_program(wrapper, divisor, module.task, checkpoint, opset)
    _strip_inner_shapes(program.model.graph)
    _name_dims(program.model.graph)
    metadata = _metadata(module, settings, stage_index)
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    program.model.doc_string = f"K-Net ({module.task.name}), stage {stage_index} of {checkpoint.name}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out_path))
    try:
        _check_export(out_path, wrapper, divisor)
    except RuntimeError:
        out_path.unlink(missing_ok=True)  # a graph that computes something else must not be used
        raise
    log.info("exported %s stage %d (%s) to %s: %s -> %s", checkpoint, stage_index, module.task.name, out_path,
             INPUT_NAME, ", ".join(names))  # fmt: skip
    return out_path


def _network_to_export(
    checkpoint: Path, stage: int, trusted: bool, config: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (), mode: str = "export",
) -> tuple[Any, dict[str, Any], int]:  # fmt: skip
    """The checkpoint's module rebuilt as :meth:`~knet_lightning.Segmenter.from_checkpoint` does
    (fp32), its inference settings and the index (0..S) of ``stage``."""
    module, settings, _ = checkpoint_rebuild.rebuild_module(
        checkpoint, config=config, overrides=overrides, mode=mode, trusted=trusted
    )
    num_outputs = module.num_stages + 1
    if not -num_outputs <= stage < num_outputs:
        raise ValueError(
            f"{checkpoint}: stage={stage} is outside the model's {num_outputs} outputs (0..{num_outputs - 1})"
        )
    return module.eval(), settings, stage % num_outputs


def _exported_program(
    wrapper: nn.Module, divisor: int, task: Any, checkpoint: Path, opset: int | None
) -> tuple[Any, list[str]]:
    """``torch.onnx.export(dynamo=True)`` of ``wrapper`` with dynamic batch, height and width, and
    its output names; an error names the checkpoint, also where the exporter fixed a size."""
    # batch 2 and unequal sides: torch.export specialises a dimension that is 1 in the example,
    # and equal H and W could be taken for one symbol
    example = torch.randn(2, 3, 2 * divisor, 3 * divisor, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = wrapper(example)
    names = ["mask_logits", "cls_logits"][: len(outputs)]
    if task.unpadded_inference:  # the semantic task reads each image at its own size
        dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    else:
        # H and W as multiples of the size divisor, as every input is padded: the Swin backbone's
        # window padding and shifted-window masks then give torch.export guards it can prove for
        # every size (with free H and W it specialises them to the example's)
        dims = {0: torch.export.Dim("batch"), 2: divisor * torch.export.Dim("height_blocks", min=1, max=1024),
                3: divisor * torch.export.Dim("width_blocks", min=1, max=1024)}  # fmt: skip
    try:
        with torch.no_grad(), _exporter_logs_at_warning():
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=names,
                dynamic_shapes={INPUT_NAME: dims}, opset_version=opset, verbose=False,
            )  # fmt: skip
    except Exception as err:  # the exporter's own errors are long; say first which model failed
        raise RuntimeError(f"{checkpoint}: ONNX export of the {task.name} network failed: {err}") from err
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise RuntimeError(f"{checkpoint}: torch.onnx.export returned no program")
    shape = program.model.graph.inputs[0].shape
    fixed = [f"{name}={shape[axis]}" for axis, name in ((0, "batch"), (2, "height"), (3, "width"))
             if isinstance(shape[axis], int)]  # fmt: skip
    if fixed:
        # torch.export turns a dynamic size static, without an error, where the code branches on
        # it in a way it cannot prove for every size (the Swin backbone did with free H and W)
        raise RuntimeError(
            f"{checkpoint}: the exported {task.name} network fixes the input's {', '.join(fixed)} "
            f"(torch.export specialised them); such a graph runs at the example size only, so nothing is written"
        )
    return program, names


def _metadata(module: Any, settings: dict[str, Any], stage_index: int) -> dict[str, Any]:
    """What post-processing needs, stored in the file (:data:`~.onnx_runtime.METADATA_KEYS`)."""
    task = module.task
    return {
        MODEL_CONFIG_KEY: module.model_config,
        INFERENCE_KEY: settings,
        CLASSES_KEY: {"class_names": list(module.class_names), "isthing": [bool(t) for t in module.isthing],
                      "colors": [list(c) for c in module.colors] if module.colors else None},
        TASK_KEY: {"name": task.name, "num_classes": task.num_classes, "num_things": task.num_things,
                   "num_proposals": task.num_proposals, "num_stages": task.num_stages,
                   "settings": task.settings.to_dict()},
        STAGE_KEY: stage_index,
        FORMAT_KEY: FORMAT_VERSION,
    }  # fmt: skip


def _strip_inner_shapes(graph: Any) -> None:
    """The exporter annotates every intermediate value with a symbolic shape, and under the Swin
    backbone some of those are wrong at sizes other than the example's (ONNX Runtime's memory
    planner then reuses a (1, 49, 49) window-mask buffer for a (2, 49, 49) one and fails); ONNX
    Runtime infers the shapes it needs from the inputs itself."""
    for node in graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None


def _name_dims(graph: Any) -> None:
    """The graph's dynamic sizes by what they are (``batch``, ``height``, ``width``, ``height_4``,
    ``width_4``) rather than the exporter's symbols (``32*s75``), for whoever reads the file."""
    import onnx_ir as ir

    graph.inputs[0].shape = ir.Shape(["batch", 3, "height", "width"])
    masks = graph.outputs[0]
    masks.shape = ir.Shape(["batch", masks.shape[1], "height_4", "width_4"])
    if len(graph.outputs) > 1:
        classes = graph.outputs[1]
        classes.shape = ir.Shape(["batch", classes.shape[1], classes.shape[2]])


def _check_export(path: Path, wrapper: nn.Module, divisor: int) -> None:
    """ONNX Runtime against PyTorch on a batch and size unlike the export example's, so that a
    shape baked into the graph fails here and not in a user's pipeline."""
    images = torch.randn(1, 3, 3 * divisor, 2 * divisor, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = wrapper(images)
    try:
        got = OnnxRuntimeNetwork(path, threads=1).run(images)
    except Exception as err:  # ONNX Runtime's errors are not RuntimeErrors
        shape = (1, 3, 3 * divisor, 2 * divisor)
        raise RuntimeError(f"{path}: ONNX Runtime cannot run a {shape} input: {err}") from err
    diffs = [_relative_diff(r, torch.from_numpy(g)) for r, g in zip(ref, got)]
    if len(got) != len(ref) or any(r.shape != g.shape for r, g in zip(ref, got)) or max(diffs) > _EXPORT_CHECK_TOL:
        raise RuntimeError(
            f"{path}: ONNX Runtime disagrees with PyTorch on a (1, 3, {3 * divisor}, {2 * divisor}) input: "
            f"shapes {[tuple(g.shape) for g in got]} vs {[tuple(r.shape) for r in ref]}, relative "
            f"differences {diffs}"
        )
    log.info("%s: ONNX Runtime matches PyTorch to %.1e of max|logit| at %dx%d", path, max(diffs),
             3 * divisor, 2 * divisor)  # fmt: skip


def onnxruntime_network(
    path: str | Path, stage: int = -1, trusted: bool = False, config: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> OnnxRuntimeNetwork:  # fmt: skip
    """An :class:`OnnxRuntimeNetwork` from an ``.onnx`` file, or from a checkpoint exported (at
    ``stage``) into a temporary file first. With an ``.onnx`` file, ``stage`` must be -1 or the
    stage it was exported with. ``config`` / ``overrides``: a run's ``model`` config and command
    line (``mode=predict``), under the rebuild's policy (checked before any export); the
    post-processing and test-time strategy are then the resulting config's."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        network = OnnxRuntimeNetwork(path)
        outputs = network.num_stages + 1
        if not -outputs <= stage < outputs:
            raise ValueError(f"{path}: stage={stage} is outside the model's {outputs} outputs (0..{outputs - 1})")
        if stage != -1 and stage % outputs != network.stage:
            raise ValueError(
                f"{path} holds stage {network.stage} of 0..{network.num_stages} only, got stage={stage}; export "
                "the checkpoint again with that stage"
            )
        if config is not None:
            stored = {MODEL_CONFIG_KEY: network.model_config}
            _run_settings(network, checkpoint_rebuild.checkpoint_model_config(stored, path, config, overrides))
        return network
    with tempfile.TemporaryDirectory(prefix="knet_onnx_") as folder:
        # the session keeps the graph in memory: the file may go
        run = {} if config is None else {"config": config, "overrides": overrides, "mode": "predict"}
        exported = export_onnx(path, Path(folder) / f"{path.stem}.onnx", stage=stage, trusted=trusted, **run)
        network = OnnxRuntimeNetwork(exported)
    if config is not None:
        _run_settings(network, network.model_config)
    return network


def _run_settings(network: OnnxRuntimeNetwork, model_cfg: Mapping[str, Any]) -> None:
    """The post-processing and test-time strategy of ``model_cfg`` (a run's, under the rebuild's
    policy) on an exported network."""
    from knet_lightning.inference.test_time import TestTimeSettings

    task = network.task
    task.settings = task.settings_cls.from_config({**task.settings.to_dict(), **(model_cfg.get("postprocess") or {})})
    network.test_time = TestTimeSettings.from_config(dict(model_cfg.get("test_time") or {}))
