"""The networks: K-Net for panoptic and instance segmentation (:class:`KNet`) and for semantic
segmentation (:class:`~knet_lightning.models.semantic_knet.SemanticKNet`), and their parts.

Owns: the backbones (``resnet.py``, its deformable convs in ``dcn.py``, Swin in ``swin.py`` with
its blocks in ``swin_blocks.py``, the choice between them and the FPN in ``backbone.py``), the
semantic FPN neck (``neck.py``), the kernel head and kernel update heads (``kernel_head.py``,
``kernel_update.py``), the semantic decode heads (``semantic_head.py``), the per-stage output
contract that the criterion, tasks and exports read (``outputs.py``: :class:`StageOutput`), and
the reading of weight files (``weights.py``). The parameter names are those of the converted
and published checkpoints: a rename breaks loading them.

Imports: layer 4 of the package (see :mod:`knet_lightning`), so only layers 1 to 3 (errors /
constants / settings, runtime, data); today none of them: torch and torchvision only. Nothing
from criterion, postprocess, evaluation or the layers above, which import from here.
"""

from knet_lightning.models.backbone import FPN
from knet_lightning.models.kernel_head import KernelHead, KernelHeadOutput
from knet_lightning.models.kernel_update import (
    KernelUpdateHead,
    KernelUpdateOutput,
    KernelUpdator,
    dynamic_conv,
    group_feature_assembling,
)
from knet_lightning.models.knet import KNet
from knet_lightning.models.neck import SemanticFPNNeck, SinePositionalEncoding
from knet_lightning.models.outputs import StageOutput
from knet_lightning.models.resnet import ResNetBackbone

__all__ = [
    "FPN",
    "KNet",
    "KernelHead",
    "KernelHeadOutput",
    "KernelUpdateHead",
    "KernelUpdateOutput",
    "KernelUpdator",
    "ResNetBackbone",
    "SemanticFPNNeck",
    "SinePositionalEncoding",
    "StageOutput",
    "dynamic_conv",
    "group_feature_assembling",
]
