"""Kernel updator and one kernel update head (paper §3.2; the official
``knet/kernel_updator.py`` and ``knet/det/kernel_update_head.py``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knet_lightning.models.outputs import KernelUpdateOutput

#: Focal-loss prior: bias so that sigmoid(bias) = 0.01 at init (``bias_init_with_prob(0.01)``).
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def group_feature_assembling(mask_logits: Tensor, features: Tensor, hard_mask_thr: float = 0.5) -> Tensor:
    """Sum of ``features`` over each binarized mask: ``F^K[b,n] = sum_uv 1[sigmoid(M) > thr] F[b,:,u,v]``.

    The sum is unnormalized (not a mean) and the mask is hard, so no gradient flows into
    ``mask_logits``. Masks are bilinearly resized to the feature size if they differ. The
    einsum runs in fp32 even under autocast: the sum over ~1e4 pixels overflows fp16.

    Args:
        mask_logits: ``(B, N, h', w')`` mask logits.
        features: ``(B, C, h, w)``.
        hard_mask_thr: threshold on the mask probability.

    Returns:
        ``(B, N, C)`` fp32 assembled features.
    """
    if mask_logits.shape[-2:] != features.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False)
    masks = (mask_logits.detach().sigmoid() > hard_mask_thr).float()
    device_type = features.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            return torch.einsum("bnhw,bchw->bnc", masks, features.float())
    return torch.einsum("bnhw,bchw->bnc", masks, features.float())


def dynamic_conv(kernels: Tensor, features: Tensor) -> Tensor:
    """1x1 dynamic convolution with per-image kernels: ``(B, N, C) x (B, C, h, w) -> (B, N, h, w)``.

    Same as looping ``F.conv2d(features[b:b+1], kernels[b][..., None, None])`` over images,
    but one batched op (and exportable: no predicted weights fed to a conv).
    """
    return torch.einsum("bnc,bchw->bnhw", kernels, features)


class KernelUpdator(nn.Module):
    """Adaptive kernel update (paper Eq. 3-6 plus the official extra FC-LN-ReLU).

    With ``F^K`` the assembled group feature and ``K`` the previous kernel::

        [f_in, f_out] = dynamic_layer(F^K)          [k_in, k_out] = input_layer(K)
        F^G = f_in * k_in
        G^F = sigmoid(norm_in(update_gate(F^G)))    G^K = sigmoid(input_norm_in(input_gate(F^G)))
        K~  = G^F * norm_out(f_out) + G^K * input_norm_out(k_out)
        K'  = ReLU(fc_norm(fc_layer(K~)))

    Works on any leading dims: ``(..., in_channels) x (..., in_channels) -> (..., out_channels)``.
    """

    def __init__(self, in_channels: int = 256, feat_channels: int = 256, out_channels: int = 256) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.out_channels = out_channels
        self.dynamic_layer = nn.Linear(in_channels, 2 * feat_channels)
        self.input_layer = nn.Linear(in_channels, 2 * feat_channels)
        self.input_gate = nn.Linear(feat_channels, feat_channels)
        self.update_gate = nn.Linear(feat_channels, feat_channels)
        self.norm_in = nn.LayerNorm(feat_channels)
        self.norm_out = nn.LayerNorm(feat_channels)
        self.input_norm_in = nn.LayerNorm(feat_channels)
        self.input_norm_out = nn.LayerNorm(feat_channels)
        self.activation = nn.ReLU(inplace=True)
        self.fc_layer = nn.Linear(feat_channels, out_channels)
        self.fc_norm = nn.LayerNorm(out_channels)

    def forward(self, update_feature: Tensor, input_feature: Tensor) -> Tensor:
        """``update_feature`` F^K ``(B, N, C)``, ``input_feature`` K ``(B, N, C)`` -> ``(B, N, C_out)``."""
        if update_feature.shape[-1] != self.in_channels or input_feature.shape[-1] != self.in_channels:
            raise ValueError(
                f"KernelUpdator expects last dim {self.in_channels}, got update_feature "
                f"{tuple(update_feature.shape)} and input_feature {tuple(input_feature.shape)}"
            )
        param_in, param_out = self.dynamic_layer(update_feature).split(self.feat_channels, dim=-1)
        input_in, input_out = self.input_layer(input_feature).split(self.feat_channels, dim=-1)
        gate_feats = input_in * param_in
        input_gate = self.input_norm_in(self.input_gate(gate_feats)).sigmoid()
        update_gate = self.norm_in(self.update_gate(gate_feats)).sigmoid()
        features = update_gate * self.norm_out(param_out) + input_gate * self.input_norm_out(input_out)
        return self.activation(self.fc_norm(self.fc_layer(features)))


def _fc_ln_relu(channels: int) -> list[nn.Module]:
    return [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)]


class KernelUpdateHead(nn.Module):
    """One kernel update stage (instance/panoptic version, official ``KernelUpdateHead`` with 1x1 kernels).

    Steps: feature transform (1x1 conv) -> group feature assembling with the previous
    binarized masks -> ``KernelUpdator`` -> kernel interaction (post-norm MHSA + FFN) ->
    classification branch and mask branch (dynamic 1x1 conv on the transformed features).

    Args:
        num_classes: classifier outputs (sigmoid, no background).
        channels: kernel / feature channels C.
        feedforward_channels: FFN hidden width.
        num_heads: attention heads.
        num_cls_fcs: Linear(no bias)-LN-ReLU blocks before ``fc_cls``.
        num_mask_fcs: Linear(no bias)-LN-ReLU blocks before ``fc_mask``.
        hard_mask_thr: binarization threshold of the assembling masks.
        dropout: attention and FFN dropout.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int = 256,
        feedforward_channels: int = 2048,
        num_heads: int = 8,
        num_cls_fcs: int = 1,
        num_mask_fcs: int = 1,
        hard_mask_thr: float = 0.5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"KernelUpdateHead channels={channels} must be divisible by num_heads={num_heads}")
        self.num_classes = num_classes
        self.channels = channels
        self.hard_mask_thr = hard_mask_thr
        self.feat_transform = nn.Conv2d(channels, channels, 1)
        self.kernel_update_conv = KernelUpdator(channels, channels, channels)
        self.attention = nn.MultiheadAttention(channels, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, feedforward_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(feedforward_channels, channels),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(channels)
        self.cls_fcs = nn.Sequential(*[m for _ in range(num_cls_fcs) for m in _fc_ln_relu(channels)])
        self.fc_cls = nn.Linear(channels, num_classes)
        self.mask_fcs = nn.Sequential(*[m for _ in range(num_mask_fcs) for m in _fc_ln_relu(channels)])
        self.fc_mask = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official ``init_weights`` (``knet/det/kernel_update_head.py``, which
        ``KernelIterHead.init_weights`` calls for every stage): Xavier-uniform for every
        parameter with dim > 1, ``fc_cls`` bias at the 0.01 prior; 1-D parameters keep their
        constructor's values, so ``feat_transform``'s bias stays at the zero that mmcv's
        ``ConvModule`` gives it."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.feat_transform.bias)
        nn.init.constant_(self.fc_cls.bias, PRIOR_BIAS)

    def forward(self, features: Tensor, kernels: Tensor, mask_logits: Tensor) -> KernelUpdateOutput:
        """Update kernels and predict masks and classes.

        Args:
            features: shared feature map F ``(B, C, h, w)`` (stride 8).
            kernels: previous kernels K_{i-1} ``(B, N, C)``.
            mask_logits: previous mask logits M_{i-1} ``(B, N, h', w')`` (resized if needed).

        Returns:
            ``KernelUpdateOutput(kernels (B, N, C), mask_logits (B, N, h, w), cls_logits (B, N, num_classes))``.
        """
        x = self.feat_transform(features)
        x_feat = group_feature_assembling(mask_logits, x, self.hard_mask_thr)
        obj = self.kernel_update_conv(x_feat, kernels)
        # Post-norm transformer layer over the N kernels of each image (mmcv adds residuals inside).
        obj = self.attention_norm(obj + self.attention(obj, obj, obj, need_weights=False)[0])
        obj = self.ffn_norm(obj + self.ffn(obj))
        cls_logits = self.fc_cls(self.cls_fcs(obj))
        mask_kernels = self.fc_mask(self.mask_fcs(obj))
        new_masks = dynamic_conv(mask_kernels, x)
        return KernelUpdateOutput(obj, new_masks, cls_logits)
