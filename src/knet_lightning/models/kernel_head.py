"""Kernel head: stage 0 of K-Net (official ``ConvKernelHead``): initial masks, kernels and semantic logits."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from knet_lightning.models.kernel_update import PRIOR_BIAS, group_feature_assembling
from knet_lightning.models.neck import conv_gn_relu


class KernelHeadOutput(NamedTuple):
    """Stage-0 results at stride 8.

    Attributes:
        kernels: ``(B, N, C)`` initial kernels K0; panoptic: ``N = num_proposals + num_stuff``
            with the stuff kernels (``conv_seg`` rows) last.
        mask_logits: ``(B, N, h, w)`` initial mask logits M0 (panoptic: stuff logits appended).
        features: ``(B, C, h, w)`` F = loc_feat + sem_feat, shared by all update stages.
        sem_logits: ``(B, num_things + num_stuff, h, w)`` ``conv_seg`` logits.
    """

    kernels: Tensor
    mask_logits: Tensor
    features: Tensor
    sem_logits: Tensor


class KernelHead(nn.Module):
    """Initial kernels from the localization / semantic features.

    ``loc_feat`` and ``sem_feat`` are 1x1 conv-GN-ReLU of the neck's two outputs.
    M0 = ``init_kernels``(loc_feat) (1x1 conv, no bias); ``sem_logits`` = ``conv_seg``(sem_feat);
    F = loc_feat + sem_feat; K0[n] = ``init_kernels.weight[n]`` + sum of F over
    ``sigmoid(M0[n]) > hard_mask_thr``. With ``num_stuff > 0`` (panoptic) the stuff channels
    of ``sem_logits`` are appended to M0 and the matching ``conv_seg.weight`` rows to K0.

    Args:
        num_proposals: number of instance kernels N.
        num_things: thing classes (first columns of ``conv_seg``).
        num_stuff: stuff classes (last columns); 0 for instance segmentation.
        channels: feature / kernel channels C.
        num_groups: GroupNorm groups.
        hard_mask_thr: binarization threshold for assembling.
    """

    def __init__(
        self,
        num_proposals: int = 100,
        num_things: int = 80,
        num_stuff: int = 0,
        channels: int = 256,
        num_groups: int = 32,
        hard_mask_thr: float = 0.5,
    ) -> None:
        super().__init__()
        if num_proposals < 1 or num_things < 1 or num_stuff < 0:
            raise ValueError(
                f"KernelHead needs num_proposals >= 1, num_things >= 1, num_stuff >= 0; "
                f"got {num_proposals}, {num_things}, {num_stuff}"
            )
        self.num_proposals = num_proposals
        self.num_things = num_things
        self.num_stuff = num_stuff
        self.channels = channels
        self.hard_mask_thr = hard_mask_thr
        self.loc_convs = conv_gn_relu(channels, channels, 1, num_groups)
        self.seg_convs = conv_gn_relu(channels, channels, 1, num_groups)
        self.init_kernels = nn.Conv2d(channels, num_proposals, 1, bias=False)
        self.conv_seg = nn.Conv2d(channels, num_things + num_stuff, 1)
        for m in (self.loc_convs[0], self.seg_convs[0]):
            nn.init.normal_(m.weight, std=0.01)
        nn.init.normal_(self.init_kernels.weight, std=1.0)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.constant_(self.conv_seg.bias, PRIOR_BIAS)

    @property
    def num_kernels(self) -> int:
        return self.num_proposals + self.num_stuff

    def forward(self, loc_feat: Tensor, sem_feat: Tensor) -> KernelHeadOutput:
        """``loc_feat``, ``sem_feat``: neck outputs ``(B, C, h, w)`` -> :class:`KernelHeadOutput`."""
        b = loc_feat.shape[0]
        loc = self.loc_convs(loc_feat)
        sem = self.seg_convs(sem_feat)
        mask_logits = self.init_kernels(loc)
        sem_logits = self.conv_seg(sem)
        features = loc + sem
        # The learned kernel is both the 1x1 conv that made M0 and the bias of K0 ("proposal_feats_with_obj").
        kernels = self.init_kernels.weight.flatten(1)[None] + group_feature_assembling(
            mask_logits, features, self.hard_mask_thr
        )
        if self.num_stuff > 0:
            mask_logits = torch.cat([mask_logits, sem_logits[:, self.num_things :]], dim=1)
            stuff_kernels = self.conv_seg.weight[self.num_things :].flatten(1)[None].expand(b, -1, -1)
            kernels = torch.cat([kernels, stuff_kernels.to(kernels.dtype)], dim=1)
        return KernelHeadOutput(kernels, mask_logits, features, sem_logits)
