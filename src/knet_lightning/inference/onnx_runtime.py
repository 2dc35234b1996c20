"""An exported K-Net run by ONNX Runtime: the file's metadata and the session that stands in for
a ``KNetModule`` in the :class:`~knet_lightning.Segmenter` (``backend="onnxruntime"``).

:func:`~knet_lightning.inference.onnx_export.export_onnx` writes the file; everything
post-processing needs is in its ``metadata_props`` (JSON strings, :data:`METADATA_KEYS`), so the
``.onnx`` file alone suffices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from knet_lightning.checkpoint.keys import INFERENCE_KEY, MODEL_CONFIG_KEY
from knet_lightning.models.outputs import StageOutput

__all__ = ["INPUT_NAME", "METADATA_KEYS", "OnnxRuntimeNetwork", "read_metadata"]

INPUT_NAME = "images"
CLASSES_KEY = "knet_classes"  # {"class_names", "isthing", "colors"} as the module resolved them
TASK_KEY = "knet_task"  # {"name", "num_classes", "num_things", "num_proposals", "num_stages", "settings"}
STAGE_KEY = "knet_stage"  # the exported stage, 0..num_stages
FORMAT_KEY = "knet_onnx_format"
FORMAT_VERSION = 1
METADATA_KEYS = (MODEL_CONFIG_KEY, INFERENCE_KEY, CLASSES_KEY, TASK_KEY, STAGE_KEY, FORMAT_KEY)


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
