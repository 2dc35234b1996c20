"""The Swin Transformer backbone: parity with MMSegmentation's SwinTransformer on the same weights,
both published layouts (OpenMMLab and the original ImageNet release), freezing, autocast, and a
Swin K-Net that trains."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mmseg_peer as peer
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from knet_lightning.models.swin import (
    SWIN_ARCHS,
    SwinBackbone,
    swin_from_openmmlab,
    swin_from_original,
    swin_to_openmmlab,
)
from knet_lightning.models.swin_blocks import PatchMerging

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# the bound: every output level to 1e-5 x its max |value|
TOL = 1e-5


def mmseg_swin(arch: str, window: int, seed: int = 0) -> nn.Module:
    """MMSegmentation 1.2.2's SwinTransformer as the K-Net Swin configs build it, random weights."""
    peer.import_mmseg()
    from mmseg.models.backbones.swin import SwinTransformer

    embed, depths, heads = SWIN_ARCHS[arch]
    model = SwinTransformer(
        embed_dims=embed, depths=list(depths), num_heads=list(heads), window_size=window, drop_path_rate=0.3
    )
    peer.randomize_(model, seed)
    model.eval()  # mmseg's train() returns None
    return model


def original_release_keys(arch: str, window: int = 7, image: int = 224) -> dict[str, tuple[int, ...]]:
    """The ``model`` tensors of an original Swin ImageNet release (github.com/microsoft/Swin-Transformer,
    models/swin_transformer.py), written from its structure: ``layers.{i}`` stages whose shifted
    blocks carry an ``attn_mask`` buffer (none where one window covers the stage, which then does
    not shift), ``layers.{i}.downsample`` after stages 0-2, a final ``norm`` and the 1000- or
    21841-way ``head``."""
    embed, depths, heads = SWIN_ARCHS[arch]
    keys: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (embed, 3, 4, 4),
        "patch_embed.proj.bias": (embed,),
        "patch_embed.norm.weight": (embed,),
        "patch_embed.norm.bias": (embed,),
    }
    n = window * window
    for i, (depth, h) in enumerate(zip(depths, heads)):
        dim, res = embed * 2**i, image // 4 // 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            keys |= {f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,)}
            if j % 2 == 1 and res > window:
                keys[f"{p}.attn_mask"] = ((res // window) ** 2, n, n)
            keys |= {
                f"{p}.attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                f"{p}.attn.relative_position_index": (n, n),
                f"{p}.attn.qkv.weight": (3 * dim, dim),
                f"{p}.attn.qkv.bias": (3 * dim,),
                f"{p}.attn.proj.weight": (dim, dim),
                f"{p}.attn.proj.bias": (dim,),
                f"{p}.norm2.weight": (dim,),
                f"{p}.norm2.bias": (dim,),
                f"{p}.mlp.fc1.weight": (4 * dim, dim),
                f"{p}.mlp.fc1.bias": (4 * dim,),
                f"{p}.mlp.fc2.weight": (dim, 4 * dim),
                f"{p}.mlp.fc2.bias": (dim,),
            }
        if i < len(depths) - 1:
            keys |= {
                f"layers.{i}.downsample.reduction.weight": (2 * dim, 4 * dim),
                f"layers.{i}.downsample.norm.weight": (4 * dim,),
                f"layers.{i}.downsample.norm.bias": (4 * dim,),
            }
    last = embed * 2 ** (len(depths) - 1)
    classes = 1000 if arch in ("tiny", "small") else 21841
    return keys | {
        "norm.weight": (last,),
        "norm.bias": (last,),
        "head.weight": (classes, last),
        "head.bias": (classes,),
    }


def random_tensors(keys: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in keys.items():
        if key.endswith("relative_position_index"):
            out[key] = peer.relative_position_index(math.isqrt(shape[0]))
        elif key.endswith("attn_mask"):
            out[key] = torch.zeros(shape)  # its values are never read back
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=gen)
    return out


def unfold_order(tensor: torch.Tensor) -> torch.Tensor:
    """The original release's patch-merging channels in ``nn.Unfold`` order, as MMSegmentation's
    tools/model_converters/swin2mmseg.py rewrites them (reduction weight and norm alike)."""
    lead, width = tensor.shape[:-1], tensor.shape[-1]
    t = tensor.reshape(*lead, 4, width // 4)[..., [0, 2, 1, 3], :]
    return t.transpose(-1, -2).reshape(*lead, width)


def original_to_mmseg(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """swin2mmseg.py's renaming, written from its documented rules, for the reference model."""
    out = {}
    for key, value in state.items():
        if key.startswith("head") or key.startswith("norm.") or key.endswith("attn_mask"):
            continue
        new = key.replace("layers.", "stages.").replace("patch_embed.proj", "patch_embed.projection")
        new = new.replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.")
        new = new.replace(".mlp.fc2.", ".ffn.layers.1.")
        if "downsample" in key:
            value = unfold_order(value)
        out[new] = value
    return out


def test_gradients_match_mmsegmentation_swin_with_padding() -> None:
    """The q/k/v bias reaches the padding's slots (qkv(0) = bias, as the reference's zero
    padding gives) and the padding's keys enter the softmax: every parameter's gradient is the
    reference's, on a size that pads every stage."""
    ref = mmseg_swin("tiny", 7)
    ref.eval()  # no drop path, so the two draw nothing at random (its train() returns None)
    ours = SwinBackbone("tiny", window_size=7).eval()
    ours.load_state_dict(swin_from_openmmlab(ref.state_dict()), strict=True)
    x = torch.randn(1, 3, 97, 131, generator=torch.Generator().manual_seed(3))
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(ours(x))]
    for model in (ref, ours):
        sum((o * w).sum() for o, w in zip(model(x), weights)).backward()
    grads = swin_to_openmmlab({k: p.grad for k, p in ours.named_parameters()})
    expected = {k: p.grad for k, p in ref.named_parameters()}
    assert grads.keys() == expected.keys()
    for key, grad in grads.items():
        assert (grad - expected[key]).abs().max() <= 1e-4 * expected[key].abs().max(), key
    assert expected["stages.3.blocks.1.attn.w_msa.qkv.bias"].abs().max() > 0


@pytest.mark.parametrize("window", [7, 12])
def test_matches_mmsegmentation_swin_on_the_same_weights(window: int) -> None:
    ref = mmseg_swin("tiny", window)
    ours = SwinBackbone("tiny", window_size=window).eval()
    state = ref.state_dict()
    ours.load_state_dict(swin_from_openmmlab(state), strict=True)
    back = swin_to_openmmlab(ours.state_dict())
    assert back.keys() == {k for k in state if not k.endswith("relative_position_index")}
    assert all(torch.equal(back[k], state[k]) for k in back)
    # one size a multiple of every stage's window (window 7 at 224: one window covers the last
    # stage, where the shifted blocks still shift), one not a multiple of anything
    for size in [(224, 224), (97, 131)]:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
        with torch.no_grad():
            expected, got = ref(x), ours(x)
        assert len(got) == 4
        for level, (a, b) in enumerate(zip(got, expected)):
            assert a.shape == b.shape == (2, 96 * 2**level, math.ceil(size[0] / 2 ** (level + 2)),
                                          math.ceil(size[1] / 2 ** (level + 2)))  # fmt: skip
            assert (a - b).abs().max() <= TOL * b.abs().max(), (size, level)


def test_patch_merging_equals_openmmlab_patch_merging_on_odd_sizes() -> None:
    peer.import_mmseg()
    from mmseg.models.utils.embed import PatchMerging as MMPatchMerging

    ref = MMPatchMerging(in_channels=8, out_channels=16, stride=2, norm_cfg=dict(type="LN"))
    peer.randomize_(ref, seed=4)
    ours = PatchMerging(8)
    ours.load_state_dict(ref.state_dict())  # the same names and, in Unfold order, the same layout
    x = torch.randn(2, 7, 9, 8)
    with torch.no_grad():
        expected, hw = ref(x.flatten(1, 2), (7, 9))
        got = ours(x)
    assert hw == (4, 5) and got.shape == (2, 4, 5, 16)
    assert torch.allclose(got.flatten(1, 2), expected, atol=1e-6, rtol=1e-6)


def test_original_release_merging_weights_are_permuted_on_loading() -> None:
    release = random_tensors(original_release_keys("tiny"), seed=1)
    ours = SwinBackbone("tiny").eval()
    ours.load_state(release, "release")
    unpermuted = SwinBackbone("tiny").eval()
    state = swin_from_original(release, unpermuted.state_dict())
    for i in range(3):
        for name in ("reduction.weight", "norm.weight", "norm.bias"):
            state[f"stages.{i}.downsample.{name}"] = release[f"layers.{i}.downsample.{name}"]
    missing, unexpected = unpermuted.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("norm") for k in missing)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), unpermuted(x)
    assert torch.equal(a[0], b[0])  # before any merging
    assert (a[1] - b[1]).abs().max() > 0.1 * a[1].abs().max()


def test_original_release_file_loads_and_equals_the_mmsegmentation_conversion(tmp_path: Path) -> None:
    keys = original_release_keys("tiny")
    release = random_tensors(keys, seed=2)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": release}, path)  # the release's layout: one "model" entry

    ours = SwinBackbone("tiny", window_size=7, weights_path=str(path)).eval()
    sd = ours.state_dict()
    assert torch.equal(sd["stages.1.blocks.0.mlp.0.weight"], release["layers.1.blocks.0.mlp.fc1.weight"])
    # merging weights permuted into the Unfold order (as swin2mmseg.py does; the reference below checks it)
    assert torch.equal(
        sd["stages.2.downsample.reduction.weight"], unfold_order(release["layers.2.downsample.reduction.weight"])
    )
    # the release has no per-stage output norms: they keep their init
    assert torch.equal(sd["norm3.weight"], torch.ones(768))

    ref = mmseg_swin("tiny", 7)
    missing, unexpected = ref.load_state_dict(original_to_mmseg(release), strict=False)
    assert not unexpected and all(k.startswith("norm") for k in missing)
    for i in range(4):
        getattr(ref, f"norm{i}").load_state_dict(getattr(ours, f"norm{i}").state_dict())
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x)):
            assert (a - b).abs().max() <= TOL * b.abs().max()


def test_original_release_tables_are_resized_to_another_window(tmp_path: Path) -> None:
    keys = original_release_keys("tiny", window=7)
    release = random_tensors(keys, seed=3)
    # a constant table per head: bicubic resizing keeps constants, so each head's bias survives
    for key in [k for k in release if k.endswith("relative_position_bias_table")]:
        release[key] = torch.arange(release[key].shape[1], dtype=torch.float32).expand_as(release[key]).clone()
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": release}, path)
    ours = SwinBackbone("tiny", window_size=12, weights_path=str(path))
    table = ours.state_dict()["stages.2.blocks.3.attn.relative_position_bias_table"]
    assert table.shape == (23 * 23, 12)
    assert torch.allclose(table, torch.arange(12, dtype=torch.float32).expand(23 * 23, 12), atol=1e-5)
    # a mismatch other than the table's size is an error that names the file
    del release["layers.0.blocks.0.norm1.weight"]
    torch.save({"model": release}, path)
    with pytest.raises(
        RuntimeError, match=r"swin_tiny_patch4_window7_224\.pth.*missing keys \['stages\.0\.blocks\.0\.norm1\.weight'\]"
    ):
        SwinBackbone("tiny", window_size=12, weights_path=str(path))


def test_frozen_stages_and_output_shapes_for_any_size() -> None:
    net = SwinBackbone("tiny", frozen_stages=2).train()
    frozen = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("stages") else "")
              for n, p in net.named_parameters() if not p.requires_grad}  # fmt: skip
    assert frozen == {"patch_embed", "stages.0", "stages.1", "norm0", "norm1"}
    assert not net.stages[1].training and net.stages[2].training
    outs = net(torch.randn(1, 3, 33, 50))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 9, 13), (1, 192, 5, 7), (1, 384, 3, 4), (1, 768, 2, 2)]


def test_channels_last_and_bf16_autocast() -> None:
    net = SwinBackbone("tiny").eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = net(x)
        got = net(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    for a, b, c in zip(ref, got, low):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        # NCHW like the reference's: the network's memory format is the convs' choice
        assert b.is_contiguous()
        assert torch.isfinite(c).all() and F.cosine_similarity(c.float().flatten(), a.flatten(), dim=0) > 0.99


def test_parameter_count_equals_mmsegmentation() -> None:
    # the paper's Table 1 Swin-T (28M with the classifier) without the classifier and final
    # norm, with the 4 output norms; Swin-L's is checked through the official K-Net Swin-L
    # panoptic key list (test_convert_mmdet.py)
    ours = sum(p.numel() for p in SwinBackbone("tiny").parameters())
    assert ours == sum(p.numel() for p in mmseg_swin("tiny", 7).parameters()) == 27_520_698


def _linear_inputs(model: SwinBackbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every linear layer of the blocks (q/k/v, output projection, MLP), for ``x``."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            seen[name] = args[0].detach().clone()

        return hook

    handles = [
        module.register_forward_hook(keep(name))
        for name, module in model.stages.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


@contextlib.contextmanager
def _references_mask(blocks: Any) -> Iterator[None]:
    """The window attention with the references' -100 for masked logits (the index cache that
    holds the mask is emptied on the way in and out)."""
    old = blocks._MASKED
    blocks._MASKED = -100.0
    blocks._window_index.cache_clear()
    try:
        yield
    finally:
        blocks._MASKED = old
        blocks._window_index.cache_clear()


def test_no_gemm_reads_the_padding_or_a_subnormal_number() -> None:
    """The padding's query rows see only masked keys; with the references' -100 their outputs are
    subnormal floats (e^-100 weights), which slow a GEMM reading them 10-100x. Here no linear
    layer reads a padding token (q/k/v are projected before the window gather, the output after
    the inverse one) nor a subnormal number; and the masked weights underflow to 0."""
    import knet_lightning.models.swin_blocks as blocks

    model = SwinBackbone("tiny", window_size=7).eval()
    x = torch.randn(1, 3, 97, 131, generator=torch.Generator().manual_seed(0))
    inputs = _linear_inputs(model, x)
    assert len(inputs) == 4 * 12 + 3  # 12 blocks x (qkv, proj, mlp x 2), 3 patch mergings
    tiny = torch.finfo(torch.float32).tiny
    assert all(int(((t != 0) & (t.abs() < tiny)).sum()) == 0 for t in inputs.values())
    for stage, side in enumerate([(25, 33), (13, 17), (7, 9), (4, 5)]):
        for block in range(len(model.stages[stage].blocks)):
            for layer in ("attn.qkv", "attn.proj"):
                # the map's own tokens only (a 25x33 map is 28x35 = 980 tokens once padded)
                assert inputs[f"{stage}.blocks.{block}.{layer}"].shape[:2] == (1, side[0] * side[1])
    # the shift mask's weights underflow to exactly 0 (the references' e^-100 does not)
    mask = blocks._window_index(25, 33, (7, 7), (3, 3), torch.device("cpu")).mask
    assert mask.min() < 0 and torch.exp(mask[mask < 0]).eq(0).all()


@pytest.mark.parametrize("size", [(224, 224), (97, 131)])
def test_the_mask_value_changes_no_output_bit(size: tuple[int, int]) -> None:
    """-1e4 instead of the references' -100: the masked weights were below fp32's resolution of
    every sum they entered, so the stage outputs are bit-identical."""
    import knet_lightning.models.swin_blocks as blocks

    model = SwinBackbone("tiny", window_size=7).eval()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        with _references_mask(blocks):
            reference = model(x)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))


def test_an_index_cached_in_inference_mode_serves_training() -> None:
    """The window index is cached per map size; one first built under ``inference_mode`` (an
    evaluation) must not make the next training step fail (autograd saves the index)."""
    import knet_lightning.models.swin_blocks as blocks

    blocks._window_index.cache_clear()
    model = SwinBackbone("tiny", window_size=7)
    x = torch.randn(1, 3, 75, 61)
    with torch.inference_mode():
        model.eval()(x)
    outputs = model.train()(x)
    sum(o.mean() for o in outputs).backward()
    assert model.patch_embed.proj.weight.grad is not None
