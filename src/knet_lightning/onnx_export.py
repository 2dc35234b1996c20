"""A trained K-Net as one ONNX file, and that file run by ONNX Runtime.

:func:`export_onnx` rebuilds the network of a checkpoint as
:meth:`~knet_lightning.Segmenter.from_checkpoint` does and exports the fp32 network of one
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
with its post-processing settings, and the exported stage. :class:`OnnxRuntimeNetwork` reads
them back; ``Segmenter.from_checkpoint("model.onnx", backend="onnxruntime")`` runs it with the
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from knet_lightning.checkpoint.keys import INFERENCE_KEY, MODEL_CONFIG_KEY
from knet_lightning.models.outputs import StageOutput

__all__ = ["INPUT_NAME", "METADATA_KEYS", "OnnxRuntimeNetwork", "export_onnx", "read_metadata"]

log = logging.getLogger(__name__)

INPUT_NAME = "images"
CLASSES_KEY = "knet_classes"  # {"class_names", "isthing", "colors"} as the module resolved them
TASK_KEY = "knet_task"  # {"name", "num_classes", "num_things", "num_proposals", "num_stages", "settings"}
STAGE_KEY = "knet_stage"  # the exported stage, 0..num_stages
FORMAT_KEY = "knet_onnx_format"
FORMAT_VERSION = 1
METADATA_KEYS = (MODEL_CONFIG_KEY, INFERENCE_KEY, CLASSES_KEY, TASK_KEY, STAGE_KEY, FORMAT_KEY)
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
    trusted: bool = False,
) -> Path:  # fmt: skip
    """Export the network of ``checkpoint`` (a training run's or ``mode=convert``'s) to ONNX.

    Args:
        checkpoint: the ``.ckpt`` file; it must carry ``knet_model_config``.
        out_path: the ``.onnx`` file to write (its folder is created).
        stage: the stage whose outputs the graph returns (-1: the last, as evaluation reads it).
        opset: the ONNX opset (None: the exporter's default; 18 or newer, the opsets of its
            operator library).
        trusted: load the checkpoint with full pickle (only for files you trust).

    Returns:
        ``out_path``. The graph maps ``images (B, 3, H, W)`` to ``mask_logits (B, N, H/4, W/4)``
        (and ``cls_logits (B, N, C)`` for panoptic/instance) with B, H and W dynamic, fp32.

    Raises:
        ValueError: the checkpoint has no model config (named in the message) or ``stage`` is
            out of range. RuntimeError: the exporter failed, or ONNX Runtime disagrees with
            PyTorch on a check input of another batch and size (the file is removed).
    """
    from knet_lightning.segmenter import Segmenter

    checkpoint, out_path = Path(checkpoint), Path(out_path)
    seg = Segmenter.from_checkpoint(checkpoint, stage=stage, trusted=trusted, precision="fp32")
    module = seg.module
    stage_index = seg.stage % (module.num_stages + 1)
    # the fp32, contiguous (NCHW) network in eval mode: KNetModule.forward may switch to
    # channels-last, a layout choice of oneDNN that ONNX has no notion of
    net = module.net.eval().to(memory_format=torch.contiguous_format)
    wrapper = _StageNetwork(net, stage_index).eval()
    divisor = int(seg.settings["size_divisor"])
    # batch 2 and unequal sides: torch.export specialises a dimension that is 1 in the example,
    # and equal H and W could be taken for one symbol
    example = torch.randn(2, 3, 2 * divisor, 3 * divisor, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = wrapper(example)
    names = ["mask_logits", "cls_logits"][: len(outputs)]
    if module.task.unpadded_inference:  # the semantic task reads each image at its own size
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
        raise RuntimeError(f"{checkpoint}: ONNX export of the {module.task.name} network failed: {err}") from err
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise RuntimeError(f"{checkpoint}: torch.onnx.export returned no program")
    shape = program.model.graph.inputs[0].shape
    fixed = [f"{name}={shape[axis]}" for axis, name in ((0, "batch"), (2, "height"), (3, "width"))
             if isinstance(shape[axis], int)]  # fmt: skip
    if fixed:
        # torch.export turns a dynamic size static, without an error, where the code branches on
        # it in a way it cannot prove for every size (the Swin backbone did with free H and W)
        raise RuntimeError(
            f"{checkpoint}: the exported {module.task.name} network fixes the input's {', '.join(fixed)} "
            f"(torch.export specialised them); such a graph runs at the example size only, so nothing is written"
        )
    task = module.task
    metadata = {
        MODEL_CONFIG_KEY: module.model_config,
        INFERENCE_KEY: seg.settings,
        CLASSES_KEY: {"class_names": list(module.class_names), "isthing": [bool(t) for t in module.isthing],
                      "colors": [list(c) for c in module.colors] if module.colors else None},
        TASK_KEY: {"name": task.name, "num_classes": task.num_classes, "num_things": task.num_things,
                   "num_proposals": task.num_proposals, "num_stages": task.num_stages,
                   "settings": task.settings.to_dict()},
        STAGE_KEY: stage_index,
        FORMAT_KEY: FORMAT_VERSION,
    }  # fmt: skip
    # the exporter annotates every intermediate value with a symbolic shape, and under the Swin
    # backbone some of those are wrong at sizes other than the example's (ONNX Runtime's memory
    # planner then reuses a (1, 49, 49) window-mask buffer for a (2, 49, 49) one and fails); ONNX
    # Runtime infers the shapes it needs from the inputs itself
    for node in program.model.graph:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None
    _name_dims(program.model.graph)
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    program.model.doc_string = f"K-Net ({task.name}), stage {stage_index} of {checkpoint.name}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out_path))
    try:
        _check_export(out_path, wrapper, divisor)
    except RuntimeError:
        out_path.unlink(missing_ok=True)  # a graph that computes something else must not be used
        raise
    log.info("exported %s stage %d (%s) to %s: %s -> %s", checkpoint, stage_index, task.name, out_path,
             INPUT_NAME, ", ".join(names))  # fmt: skip
    return out_path


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


def read_metadata(metadata: dict[str, str], source: str | Path) -> dict[str, Any]:
    """The decoded :data:`METADATA_KEYS` of an exported file (``source`` names it in errors)."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(
            f"{source}: no {', '.join(missing)} in the ONNX metadata; only files that export_onnx (mode=export) "
            "wrote carry what post-processing needs"
        )
    decoded = {key: json.loads(metadata[key]) for key in METADATA_KEYS}
    if decoded[FORMAT_KEY] != FORMAT_VERSION:
        raise ValueError(f"{source}: ONNX metadata format {decoded[FORMAT_KEY]}, this version reads {FORMAT_VERSION}")
    return decoded


class OnnxRuntimeNetwork:
    """An exported K-Net in an ONNX Runtime session (CPU), with the task object and class
    metadata that :class:`~knet_lightning.Segmenter` reads off a ``KNetModule``.

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx`.
        threads: ONNX Runtime's intra-op threads (None: ``torch.get_num_threads()``, so that both
            backends use the same cores).

    Attributes:
        task: the :class:`~knet_lightning.tasks.SegmentationTask` rebuilt from the stored
            settings (the post-processing is the PyTorch backend's code).
        stage: the exported stage (0..num_stages); ``num_stages``: the network's S.
        inference: the ``knet_inference`` settings; ``model_config``: ``knet_model_config``.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError("backend='onnxruntime' needs ONNX Runtime: pip install 'knet-lightning[onnx]'") from err

        from knet_lightning.tasks import build_task

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path}: no such file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        # ORT's own warnings (e.g. unused initializers removed by its optimizer) are not the user's business
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        meta = read_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.model_config: dict[str, Any] = meta[MODEL_CONFIG_KEY]
        self.inference: dict[str, Any] = meta[INFERENCE_KEY]
        classes, task = meta[CLASSES_KEY], meta[TASK_KEY]
        self.class_names: list[str] = list(classes["class_names"])
        self.isthing: list[bool] = list(classes["isthing"])
        self.colors = [tuple(c) for c in classes["colors"]] if classes["colors"] else None
        self.num_stages = int(task["num_stages"])
        self.num_proposals = int(task["num_proposals"])
        self.stage = int(meta[STAGE_KEY])
        self.task = build_task(
            task["name"], num_classes=task["num_classes"], num_things=task["num_things"],
            num_proposals=task["num_proposals"], num_stages=task["num_stages"], eval_all_stages=False,
            settings=task["settings"], class_names=self.class_names,
        )  # fmt: skip
        self.output_names = [o.name for o in self.session.get_outputs()]

    # the nn.Module calls Segmenter makes on a network
    def eval(self) -> OnnxRuntimeNetwork:
        return self

    def to(self, device: str | torch.device) -> OnnxRuntimeNetwork:
        if torch.device(device).type != "cpu":
            raise ValueError(f"{self.path}: backend='onnxruntime' runs on the CPU (CPUExecutionProvider), got {device}")
        return self

    def run(self, images: Tensor) -> list[Any]:
        """The session's numpy outputs for ``images (B, 3, H, W)`` (normalised, padded)."""
        # exported for padded inputs only (export_onnx), except where the task reads them unpadded
        divisor = 1 if self.task.unpadded_inference else int(self.inference.get("size_divisor") or 1)
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % divisor or images.shape[3] % divisor:
            # the graph was exported for such inputs only; another size would not fail, only be wrong
            raise ValueError(f"{self.path}: images must be (B, 3, H, W) with H and W multiples of {divisor} "
                             f"(the Segmenter pads them so), got {tuple(images.shape)}")  # fmt: skip
        feed = {INPUT_NAME: images.detach().to("cpu", torch.float32).contiguous().numpy()}
        return self.session.run(self.output_names, feed)

    def __call__(self, images: Tensor) -> StageOutput:
        """``images (B, 3, H, W)`` -> the exported stage's :class:`StageOutput`: ``mask_logits
        (B, N, H/4, W/4)``, ``cls_logits (B, N, C)`` or None; ``kernels`` are not exported (the
        post-processing does not read them): an empty ``(B, N, 0)`` tensor."""
        outputs = dict(zip(self.output_names, (torch.from_numpy(o) for o in self.run(images))))
        masks = outputs["mask_logits"]
        return StageOutput(masks, outputs.get("cls_logits"), masks.new_zeros(masks.shape[:2] + (0,)))


def onnxruntime_network(path: str | Path, stage: int = -1, trusted: bool = False) -> OnnxRuntimeNetwork:
    """An :class:`OnnxRuntimeNetwork` from an ``.onnx`` file, or from a checkpoint exported (at
    ``stage``) into a temporary file first. With an ``.onnx`` file, ``stage`` must be -1 or the
    stage it was exported with."""
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
        return network
    with tempfile.TemporaryDirectory(prefix="knet_onnx_") as folder:
        # the session keeps the graph in memory: the file may go
        return OnnxRuntimeNetwork(export_onnx(path, Path(folder) / f"{path.stem}.onnx", stage=stage, trusted=trusted))
