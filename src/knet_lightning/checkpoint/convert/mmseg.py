"""Key names of semantic K-Net checkpoints (MMSegmentation's ``IterativeDecodeHead``) and ours.

MMSegmentation 1.x and the 0.x release behind the official K-Net README share these names
(official ``knet/seg/`` and mmseg's ``models/decode_heads/knet_head.py``): the kernel generate
head sits under ``decode_head.kernel_generate_head`` with mmcv ``ConvModule`` s (``.conv`` /
``.bn``), the update heads under ``decode_head.kernel_update_head.<i>`` with an mmcv
``MultiheadAttention`` (``attention.attn``) and ``FFN`` (``ffn.layers``). Ours are
:class:`~knet_lightning.models.semantic_knet.SemanticKNet`'s.
"""

from __future__ import annotations

from knet_lightning.checkpoint.convert.mapping import KeyMapping, kernel_update_head_pairs

_HEAD = "decode_head.kernel_generate_head"

MMSEG_SEMANTIC = KeyMapping(
    [
        ("backbone.{rest}", "backbone.{rest}"),
        (f"{_HEAD}.conv_seg.{{param}}", "decode_head.conv_seg.{param}"),
        (f"{_HEAD}.{{path}}.conv.{{param}}", "decode_head.{path}.0.{param}"),
        (f"{_HEAD}.{{path}}.bn.{{param}}", "decode_head.{path}.1.{param}"),
        ("auxiliary_head.conv_seg.{param}", "auxiliary_head.conv_seg.{param}"),
        ("auxiliary_head.{path}.conv.{param}", "auxiliary_head.{path}.0.{param}"),
        ("auxiliary_head.{path}.bn.{param}", "auxiliary_head.{path}.1.{param}"),
        *kernel_update_head_pairs("decode_head.kernel_update_head.{i}", "kernel_update_heads.{i}"),
    ],
    name="MMSegmentation K-Net (semantic), mapping v1",
)
