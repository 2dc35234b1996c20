"""Training criteria: the Hungarian matching and the K-Net losses.

Owns: the matcher of kernels to ground-truth masks (``matcher.py``), the loss functions
(``losses.py``), the batch's ground truth at the stride of the mask logits (``targets.py``), the
panoptic / instance criterion that assembles the matched, weighted losses of every stage
(``criterion.py``: :class:`KNetCriterion`, the ``_target_`` of the model configs) and the
semantic one (``semantic.py``).

Imports: layer 5 of the package (see :mod:`knet_lightning`), beside postprocess and evaluation,
so only layers 1 to 4. Today that is :mod:`knet_lightning.constants` (``IGNORE_INDEX``) and
:mod:`knet_lightning.models.outputs` (the :class:`StageOutput` it reads); nothing from
postprocess, evaluation (its own layer), tasks or above.
"""

from knet_lightning.criterion.criterion import KNetCriterion
from knet_lightning.criterion.losses import (
    dice_loss,
    mask_bce_loss,
    rank_loss,
    semantic_ce_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_dense,
)
from knet_lightning.criterion.matcher import HungarianMatcher
from knet_lightning.criterion.semantic import SemanticCriterion

__all__ = [
    "HungarianMatcher",
    "KNetCriterion",
    "SemanticCriterion",
    "dice_loss",
    "mask_bce_loss",
    "rank_loss",
    "semantic_ce_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_dense",
]
