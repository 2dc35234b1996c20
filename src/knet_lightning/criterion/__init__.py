"""Hungarian matching and K-Net losses."""

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
