"""K-Net for semantic, instance and panoptic segmentation with PyTorch Lightning and Hydra.

From Python: ``from knet_lightning import Segmenter`` (imported on first use, so that the
command line starts without it).
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
