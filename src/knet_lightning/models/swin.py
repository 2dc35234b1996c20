"""Swin Transformer backbone (Liu et al., ICCV 2021) as the K-Net Swin models use it.

Built from torchvision's Swin building blocks (``torchvision.models.swin_transformer``):
``SwinTransformerBlock`` (pre-norm window attention and MLP with stochastic depth) and its
``ShiftedWindowAttention`` parameters. torchvision, not timm: torchvision is already a
dependency, its blocks keep the ``(B, H, W, C)`` layout that window partitioning wants, and its
attention module has the original parameter names (``qkv``, ``proj``,
``relative_position_bias_table``). Two parts are ours, both so that the published K-Net Swin
models (MMDetection's and MMSegmentation's ``SwinTransformer``) give their numbers, both in
:mod:`knet_lightning.models.swin_blocks` with the patch embedding and the stages:

- the window attention's forward (:class:`~knet_lightning.models.swin_blocks.WindowAttention`):
  torchvision's ``shifted_window_attention`` drops the shift when one window covers the padded
  map, OpenMMLab's ``ShiftWindowMSA`` keeps it; the two differ on small maps (a 224x224
  input's last stage);
- :class:`~knet_lightning.models.swin_blocks.PatchMerging`, which concatenates the 2x2
  neighbours in ``nn.Unfold``'s channel order, as OpenMMLab's does, where torchvision's uses
  the original release's order. With
  the checkpoints' own order the merging's LayerNorm and Linear sum in the same order as the
  reference, which keeps the converted models' logits within fp32 rounding of MMSegmentation's
  through the kernel update stages; the original release's weights are permuted on loading.

What the backbone adds around the blocks, as MMSegmentation's / MMDetection's
``SwinTransformer`` (the layout of every published K-Net Swin checkpoint):

- a 4x4 stride-4 patch embedding (conv + LayerNorm) that pads the image's right and bottom
  to a multiple of 4 (``padding='corner'``), so any input size works; each block pads its
  map to a multiple of the window and crops back;
- a LayerNorm on each of the 4 stage outputs (``norm0..norm3``), taken before the stage's
  patch merging; outputs are ``(B, C_i, H_i, W_i)`` with ``C_i = embed_dims * 2**i`` at
  strides 4, 8, 16, 32;
- stochastic depth rates rising linearly over all blocks from 0 to ``drop_path_rate``.

Weights: :meth:`SwinBackbone.load_weights` reads the original ImageNet release
(``swin_large_patch4_window7_224_22k.pth``: ``model`` -> ``layers.{i}...``; relative-position
tables resized bicubically when the window differs) and the OpenMMLab layout
(``stages.{i}...``, ``attn.w_msa``, ``ffn.layers``); :func:`swin_from_openmmlab` /
:func:`swin_to_openmmlab` translate names, :func:`swin_from_original` also the patch-merging
channel order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knet_lightning.models.swin_blocks import PatchEmbed, SwinStage
from knet_lightning.models.weights import read_weights_file

__all__ = [
    "SWIN_ARCHS",
    "SwinBackbone",
    "swin_from_openmmlab",
    "swin_from_original",
    "swin_to_openmmlab",
]

# arch -> (embed_dims, depths, num_heads), the paper's Table 1 (Swin-T/S/B/L)
SWIN_ARCHS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
_RELEASE = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
# (arch, window) -> the original ImageNet release the official configs start from
_IMAGENET = {
    ("tiny", 7): _RELEASE + "swin_tiny_patch4_window7_224.pth",
    ("small", 7): _RELEASE + "swin_small_patch4_window7_224.pth",
    ("base", 7): _RELEASE + "swin_base_patch4_window7_224_22k.pth",
    ("base", 12): _RELEASE + "swin_base_patch4_window12_384_22k.pth",
    ("large", 7): _RELEASE + "swin_large_patch4_window7_224_22k.pth",
    ("large", 12): _RELEASE + "swin_large_patch4_window12_384_22k.pth",
}


class SwinBackbone(nn.Module):
    """Swin-T/S/B/L returning 4 LayerNorm-ed feature maps at strides 4, 8, 16, 32.

    Args:
        arch: ``"tiny"``, ``"small"``, ``"base"`` or ``"large"`` (:data:`SWIN_ARCHS`).
        window_size: attention window (7; 12 for the 384-pretrained models).
        drop_path_rate: stochastic depth of the last block (0.2 in the official Swin-L
            panoptic config, 0.3 / 0.4 in the ADE20K ones).
        mlp_ratio: MLP hidden width over the block width.
        frozen_stages: -1 trains all; 0 freezes the patch embedding; k >= 1 also stages
            0..k-1 and their output norms (MMDetection's ``frozen_stages``).
        pretrained: download the original ImageNet release for ``(arch, window_size)`` (the
            window-7 224 file, or the window-12 384 file for Swin-B/L with window 12).
        weights_path: a local file in the original release's or the OpenMMLab layout.
    """

    def __init__(
        self,
        arch: str = "tiny",
        window_size: int = 7,
        drop_path_rate: float = 0.3,
        mlp_ratio: float = 4.0,
        frozen_stages: int = -1,
        pretrained: bool = False,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        if arch not in SWIN_ARCHS:
            raise ValueError(f"Swin arch must be one of {sorted(SWIN_ARCHS)}, got {arch!r}")
        if window_size < 2:
            raise ValueError(f"Swin window_size must be >= 2, got {window_size}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"Swin frozen_stages must be in [-1, 4], got {frozen_stages}")
        embed_dims, depths, num_heads = SWIN_ARCHS[arch]
        self.arch = arch
        self.window_size = window_size
        self.frozen_stages = frozen_stages
        self.out_channels = [embed_dims * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(embed_dims)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            first = sum(depths[:i])
            self.stages.append(
                SwinStage(
                    self.out_channels[i],
                    depth,
                    heads,
                    window_size,
                    rates[first : first + depth],
                    mlp_ratio,
                    downsample=i < len(depths) - 1,
                )
            )
        for i, channels in enumerate(self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self._init_weights()
        if pretrained:
            # every arch has a window-7 release; another window resizes its bias tables
            url = _IMAGENET.get((arch, window_size), _IMAGENET[(arch, 7)])
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
            self.load_state(state, f"Swin ImageNet release {url}")
        if weights_path is not None:
            self.load_weights(weights_path)
        self.train(self.training)

    def _init_weights(self) -> None:
        # MMSegmentation's SwinTransformer init from scratch: truncated normal (std 0.02) Linear
        # weights with zero bias, LayerNorm 1/0; the bias tables keep torchvision's trunc-normal
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def load_weights(self, weights_path: str) -> None:
        """Load a local Swin state dict: the original release or the OpenMMLab layout."""
        state = read_weights_file(weights_path)
        self.load_state(state, f"backbone weights_path {str(weights_path)!r}")

    def load_state(self, state: Mapping[str, object], source: str) -> None:
        """Load the original release (``model`` / ``layers.*``) or an OpenMMLab state dict
        (``state_dict`` / ``stages.*``, with or without a ``backbone.`` prefix).

        The original release has no per-stage output norms (its ``norm`` follows the last
        stage, before the classifier): ``norm0..3`` keep their initialisation, as in
        MMSegmentation. Anything else missing, unexpected or of another shape is an error.
        """
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]  # type: ignore[assignment]
        tensors = {k.removeprefix("backbone."): v for k, v in state.items() if isinstance(v, Tensor)}
        if not tensors:
            raise RuntimeError(f"{source}: expected a Swin state dict, found no tensors")
        original = any(k.startswith("layers.") for k in tensors)
        if original:
            tensors = swin_from_original(tensors, self.state_dict())
        elif any(k.startswith("stages.") and ".w_msa." in k for k in tensors):
            tensors = swin_from_openmmlab(tensors)
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        if original:
            missing = [k for k in missing if not re.fullmatch(r"norm\d\.(weight|bias)", k)]
        if missing or unexpected:
            raise RuntimeError(
                f"{source} does not match this Swin-{self.arch} (window {self.window_size}): "
                f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )

    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = [self.patch_embed] if self.frozen_stages >= 0 else []
        for i in range(self.frozen_stages):
            mods += [self.stages[i], getattr(self, f"norm{i}")]
        return mods

    def modules_in_eval_mode(self) -> list[nn.Module]:
        """The modules that :meth:`train` keeps in eval mode: the frozen stages, with their children."""
        return [sub for m in self._frozen_modules() for sub in m.modules()]

    def train(self, mode: bool = True) -> SwinBackbone:
        """Switch mode, keeping frozen stages in eval mode and without gradients."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> ``[(B, C_i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2))) for i in 0..3]``."""
        x = self.patch_embed(images)
        outs = []
        for i, stage in enumerate(self.stages):
            out, x = stage(x)
            norm: nn.LayerNorm = getattr(self, f"norm{i}")
            # a contiguous NCHW copy, as the reference returns: the convs that read it then run in
            # the network's own memory format (channels-last only where model.channels_last
            # chose it) and sum in the reference's order
            outs.append(norm(out).permute(0, 3, 1, 2).contiguous())
        return outs


# --------------------------------------------------------------------------------------
# key layouts of published Swin weights
# --------------------------------------------------------------------------------------

_Rule = tuple[str, str]
# OpenMMLab (MMDetection / MMSegmentation SwinTransformer) -> ours; a None target drops the
# tensor (buffers that are a function of the window size)
_OPENMMLAB: tuple[tuple[str, str | None], ...] = (
    (r"patch_embed\.projection\.(.+)", r"patch_embed.proj.\1"),
    (r"(stages\.\d+\.blocks\.\d+)\.attn\.w_msa\.relative_position_index", None),
    (r"(stages\.\d+\.blocks\.\d+)\.attn\.w_msa\.(.+)", r"\1.attn.\2"),
    (r"(stages\.\d+\.blocks\.\d+)\.ffn\.layers\.0\.0\.(.+)", r"\1.mlp.0.\2"),
    (r"(stages\.\d+\.blocks\.\d+)\.ffn\.layers\.1\.(.+)", r"\1.mlp.3.\2"),
)
_ORIGINAL: tuple[tuple[str, str | None], ...] = (
    (r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_index", None),
    (r"layers\.\d+\.blocks\.\d+\.attn_mask", None),
    (r"(?:norm|head)\.(weight|bias)", None),
    (r"layers\.(\d+\.blocks\.\d+)\.mlp\.fc1\.(.+)", r"stages.\1.mlp.0.\2"),
    (r"layers\.(\d+\.blocks\.\d+)\.mlp\.fc2\.(.+)", r"stages.\1.mlp.3.\2"),
    (r"layers\.(.+)", r"stages.\1"),
)
_MERGING = re.compile(r"stages\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)")
_OURS_TO_OPENMMLAB: tuple[_Rule, ...] = (
    (r"patch_embed\.proj\.(.+)", r"patch_embed.projection.\1"),
    (r"(stages\.\d+\.blocks\.\d+)\.attn\.(.+)", r"\1.attn.w_msa.\2"),
    (r"(stages\.\d+\.blocks\.\d+)\.mlp\.0\.(.+)", r"\1.ffn.layers.0.0.\2"),
    (r"(stages\.\d+\.blocks\.\d+)\.mlp\.3\.(.+)", r"\1.ffn.layers.1.\2"),
)


def _rename(key: str, rules: Sequence[tuple[str, str | None]]) -> str | None:
    for pattern, target in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return None if target is None else match.expand(target)
    return key


def _unfold_order(tensor: Tensor) -> Tensor:
    """Patch-merging input channels from the original release's order into ``nn.Unfold``'s.

    The original release (and torchvision) concatenates the 2x2 neighbours as
    ``[x(0,0), x(1,0), x(0,1), x(1,1)]``, neighbour-major: channel ``k * C + c``. The unfold
    order is channel-major, ``c * 4 + 2 * row + col``, so neighbour ``k`` lands in slot
    ``[0, 2, 1, 3][k]``. The last dim of the reduction weight ``(2C, 4C)`` and of the norm's
    weight and bias ``(4C,)`` is permuted.
    """
    lead, width = tensor.shape[:-1], tensor.shape[-1]
    t = tensor.reshape(*lead, 4, width // 4)[..., [0, 2, 1, 3], :]
    return t.transpose(-1, -2).reshape(*lead, width).contiguous()


def swin_from_openmmlab(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An OpenMMLab ``SwinTransformer`` state dict (no ``backbone.`` prefix) in our names;
    ``relative_position_index`` buffers are dropped."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _rename(key, _OPENMMLAB)
        if new is None:
            continue
        out[new] = value
    return out


def swin_to_openmmlab(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`swin_from_openmmlab` (without the dropped index buffers)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _rename(key, _OURS_TO_OPENMMLAB)
        assert new is not None
        out[new] = value
    return out


def resize_relative_position_table(table: Tensor, window_size: int) -> Tensor:
    """``((2w-1)**2, heads)`` bias table resized bicubically to window ``window_size``, as the
    official Swin fine-tuning and MMSegmentation's ``init_weights`` do."""
    side = math.isqrt(table.shape[0])
    new = 2 * window_size - 1
    grid = table.T.reshape(1, table.shape[1], side, side).float()
    resized = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return resized.reshape(table.shape[1], new * new).T.contiguous().to(table.dtype)


def swin_from_original(state: Mapping[str, Tensor], target: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The original Swin release's ``model`` state dict in our names.

    The classifier (``head``), the final ``norm`` and the buffers ``relative_position_index``
    and ``attn_mask`` are dropped; the patch-merging weights are permuted into ``nn.Unfold``
    order; when ``target`` (our state dict) is given, bias tables of another window size are
    resized to the target's.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _rename(key, _ORIGINAL)
        if new is None:
            continue
        if target is not None and new.endswith("relative_position_bias_table") and new in target:
            want = target[new].shape[0]
            if value.shape[0] != want and value.shape[1] == target[new].shape[1]:
                value = resize_relative_position_table(value, (math.isqrt(want) + 1) // 2)
        out[new] = _unfold_order(value) if _MERGING.fullmatch(new) else value
    return out
