"""K-Net model: backbone, necks, kernel head, kernel update heads."""

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
