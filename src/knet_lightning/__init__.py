"""K-Net for semantic, instance and panoptic segmentation with PyTorch Lightning and Hydra.

From Python: ``from knet_lightning import Segmenter`` (imported on first use, so that the
command line starts without it).

The package in layers, bottom up; a part imports only parts of the layers below its own
(``tests/test_architecture.py`` checks it, from its list ``LAYERS``, and that no two modules
import each other in a circle):

1. ``errors``, ``constants``, ``settings``: what everything shares (the error summary, the
   ignore label, typed settings and the keys of command-line overrides);
2. ``runtime/``: processes, devices, SLURM, signals, sweeps, the reproduction preset, secrets,
   the experiment loggers;
3. ``data/``: the data sets' readers, transforms and data modules;
4. ``models/``: the networks;
5. ``criterion/`` (matching and losses), ``postprocess/`` (outputs to results: the merges, the
   result types, the overlays), ``evaluation/`` (metrics, official-format writers);
6. ``tasks/`` (one object per task, composing postprocess and evaluation) and ``checkpoint/``
   (what a checkpoint stores, its reading and writing, published-checkpoint conversion, the
   rebuild of its network);
7. ``inference/`` (the Segmenter, ``mode=predict``, test-time strategies, ONNX export and
   runtime) and ``training/`` (optimizer and schedule, the global batch plan, the callbacks);
8. ``module`` (the LightningModule), ``configs`` (the structured configs and resolvers Hydra
   composes with), ``run_data`` (the data module and data config of a run), ``serving/`` (``mode=serve``:
   the Segmenter behind HTTP on LitServe, its request checks and its web page);
9. ``cli``: the command line (``knet-lightning``, ``python -m knet_lightning``: ``__main__``).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Segment", "SegmentationResult", "Segmenter", "SkippedInput", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Segmenter":
        from knet_lightning.inference.segmenter import Segmenter

        return Segmenter
    if name in ("Segment", "SegmentationResult", "SkippedInput"):
        from knet_lightning.postprocess import results

        return getattr(results, name)
    raise AttributeError(f"module 'knet_lightning' has no attribute {name!r}")
