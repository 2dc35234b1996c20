"""Deformable conv (DCNv1) in the ResNet body: the op against a brute-force reference, the
mmdet ``stage_with_dcn`` layout, zero-offset init, ImageNet-weight loading, gradients, bf16."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from knet_lightning.models.dcn import DeformConv2dPack
from knet_lightning.models.resnet import ResNetBackbone

DCN_C3_C5 = (False, True, True, True)  # the official knet_s3_r101_dcn-c3-c5 config


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def quarter_r50(**kw: Any) -> ResNetBackbone:
    """A quarter-width ResNet-50: the published one's keys, a sixteenth of its parameters."""
    return ResNetBackbone(depth=50, base_channels=16, stem_channels=16, **kw)


def brute_force_deform_conv(
    x: np.ndarray,
    offset: np.ndarray,
    weight: np.ndarray,
    stride: int,
    padding: int,
    dilation: int,
) -> tuple[np.ndarray, int]:
    """DCNv1 by definition, one output pixel and kernel tap at a time.

    ``x (B, C, H, W)``, ``offset (B, 2 * G * kh * kw, Ho, Wo)`` with channel ``g * 2K + 2k`` the
    row (dy) and ``+ 1`` the column (dx) offset of tap ``k = i * kw + j`` for channel group ``g``
    (Dai et al. 2017; mmcv ``ops/deform_conv.py``), ``weight (O, C, kh, kw)`` ->
    ``(B, O, Ho, Wo)``, and how many bilinear corners fell outside the image.
    """
    b_, c_, h_, w_ = x.shape
    o_, _, kh, kw = weight.shape
    _, n_off, ho_, wo_ = offset.shape
    groups = n_off // (2 * kh * kw)
    per_group = c_ // groups
    out = np.zeros((b_, o_, ho_, wo_))
    outside = 0
    for b in range(b_):
        for oy in range(ho_):
            for ox in range(wo_):
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        sample = np.zeros(c_)
                        for g in range(groups):
                            dy = offset[b, g * 2 * kh * kw + 2 * k, oy, ox]
                            dx = offset[b, g * 2 * kh * kw + 2 * k + 1, oy, ox]
                            y = oy * stride - padding + i * dilation + dy
                            xx = ox * stride - padding + j * dilation + dx
                            y0, x0 = math.floor(y), math.floor(xx)
                            ly, lx = y - y0, xx - x0
                            chans = slice(g * per_group, (g + 1) * per_group)
                            for cy, cx, wgt in (
                                (y0, x0, (1 - ly) * (1 - lx)),
                                (y0, x0 + 1, (1 - ly) * lx),
                                (y0 + 1, x0, ly * (1 - lx)),
                                (y0 + 1, x0 + 1, ly * lx),
                            ):
                                if 0 <= cy < h_ and 0 <= cx < w_:  # zero outside the image
                                    sample[chans] += wgt * x[b, chans, cy, cx]
                                else:
                                    outside += 1
                        out[b, :, oy, ox] += weight[:, :, i, j] @ sample
    return out, outside


# --------------------------------------------------------------------------- the op


@pytest.mark.parametrize(
    ("stride", "dilation", "deform_groups"), [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 1, 2)]
)
def test_deform_conv_matches_brute_force_reference(stride: int, dilation: int, deform_groups: int) -> None:
    torch.manual_seed(stride * 10 + dilation + deform_groups * 100)
    conv = DeformConv2dPack(4, 5, 3, stride=stride, padding=dilation, dilation=dilation, deform_groups=deform_groups)
    conv = conv.double()
    # random offsets up to a few pixels, enough to reach beyond the 7x9 image's border
    with torch.no_grad():
        conv.conv_offset.weight.normal_(0.0, 0.3)
        conv.conv_offset.bias.normal_(0.0, 2.0)
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    got = conv(x)
    offset = conv.conv_offset(x).detach()
    assert offset.shape == (2, deform_groups * 18, *got.shape[-2:])
    assert offset.abs().max() > 3  # not a near-regular grid
    ref, outside = brute_force_deform_conv(
        x.numpy(), offset.numpy(), conv.weight.detach().numpy(), stride, dilation, dilation
    )
    assert outside > 50  # the zero-outside-the-image rule is exercised
    rel = (got.detach() - torch.from_numpy(ref)).abs().max().item() / np.abs(ref).max()
    print(f"stride={stride} dilation={dilation} deform_groups={deform_groups}: max rel diff {rel:.3e}")
    assert rel <= 1e-5


def test_deform_conv_zero_offsets_is_a_plain_conv_and_channels_last() -> None:
    conv = DeformConv2dPack(6, 8, 3, stride=2, padding=2, dilation=2)
    assert [n for n, _ in conv.named_parameters()] == ["weight", "conv_offset.weight", "conv_offset.bias"]
    assert conv.conv_offset.weight.shape == (18, 6, 3, 3)
    assert not conv.conv_offset.weight.any() and not conv.conv_offset.bias.any()
    x = torch.randn(2, 6, 11, 13)
    plain = torch.nn.functional.conv2d(x, conv.weight, stride=2, padding=2, dilation=2)
    torch.testing.assert_close(conv(x), plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        conv.conv_offset.bias.normal_(0.0, 1.0)
    torch.testing.assert_close(conv(x.to(memory_format=torch.channels_last)), conv(x), rtol=1e-6, atol=1e-6)


def test_deform_conv_bf16_autocast_and_bf16_parameters() -> None:
    conv = DeformConv2dPack(8, 8, 3, padding=1)
    with torch.no_grad():
        conv.conv_offset.weight.normal_(0.0, 0.1)
        conv.conv_offset.bias.normal_(0.0, 1.0)
    x = torch.randn(1, 8, 12, 12)
    ref = conv(x)
    # torchvision's CPU deform_conv2d has no bf16 kernel: the module runs it in fp32
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        auto = conv(x.bfloat16())
    assert auto.dtype == torch.bfloat16
    assert (auto.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    half = DeformConv2dPack(8, 8, 3, padding=1)
    half.load_state_dict(conv.state_dict())
    out = half.to(torch.bfloat16)(x.bfloat16())  # Lightning's "bf16-true" casts the parameters
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


# --------------------------------------------------------------------------- the ResNet body


def test_dcn_layout_param_names_and_errors() -> None:
    bb = ResNetBackbone(depth=50, dcn_stages=DCN_C3_C5)
    names = dict(bb.named_parameters())
    assert names["layer2.0.conv2.conv_offset.weight"].shape == (18, 128, 3, 3)
    assert names["layer2.0.conv2.conv_offset.bias"].shape == (18,)
    assert names["layer4.2.conv2.conv_offset.weight"].shape == (18, 512, 3, 3)
    assert names["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert not any("layer1." in n and "conv_offset" in n for n in names)
    assert isinstance(bb.layer1[0].conv2, nn.Conv2d)
    assert all(isinstance(blk.conv2, DeformConv2dPack) for i in (2, 3, 4) for blk in getattr(bb, f"layer{i}"))
    # the strided first conv2 of each stage is deformable too (fallback_on_stride=False)
    assert [bb.layer2[0].conv2.stride, bb.layer2[1].conv2.stride] == [(2, 2), (1, 1)]
    # Kaiming (fan-out) main weights, zero offsets
    w = bb.layer3[5].conv2.weight
    assert abs(w.std().item() / math.sqrt(2 / (256 * 9)) - 1) < 0.05
    assert all(
        not m.conv_offset.weight.any() and not m.conv_offset.bias.any()
        for m in bb.modules()
        if isinstance(m, DeformConv2dPack)
    )
    # dilation and the mmseg D8 body are kept
    d8 = ResNetBackbone(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), dcn_stages=DCN_C3_C5)
    assert [(c.dilation, c.padding) for c in (d8.layer4[0].conv2, d8.layer4[1].conv2)] == [
        ((2, 2), (2, 2)),
        ((4, 4), (4, 4)),
    ]
    assert [tuple(f.shape[-2:]) for f in d8.eval()(torch.randn(1, 3, 40, 48))] == [(10, 12), (5, 6)] + [(5, 6)] * 2

    with pytest.raises(ValueError, match="dcn_stages.*Bottleneck"):
        ResNetBackbone(depth=18, dcn_stages=DCN_C3_C5)
    with pytest.raises(ValueError, match="dcn_stages needs 4 booleans"):
        ResNetBackbone(depth=50, dcn_stages=(True, True, True))
    with pytest.raises(ValueError, match="dcn_stages needs 4 booleans"):
        ResNetBackbone(depth=50, dcn_stages=(0, 1, 1, 1))  # type: ignore[arg-type]
    ResNetBackbone(depth=18, dcn_stages=(False,) * 4)  # no DCN: any depth


def test_dcn_body_at_init_equals_plain_body() -> None:
    plain = ResNetBackbone(depth=50, frozen_stages=-1).double().eval()
    dcn = ResNetBackbone(depth=50, frozen_stages=-1, dcn_stages=DCN_C3_C5).double().eval()
    missing, unexpected = dcn.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".conv2.conv_offset." in k for k in missing)
    x = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(dcn(x), plain(x)):
            # zero offsets sample the exact grid values; only the summation order differs
            # (torchvision's im2col + matmul against the conv kernel), hence float64 and 1e-10
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item())


def test_plain_weights_load_into_dcn_body(tmp_path: Path) -> None:
    plain = quarter_r50(frozen_stages=-1)
    state = {**plain.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    dcn = quarter_r50(weights_path=str(path), dcn_stages=DCN_C3_C5)
    assert torch.equal(dcn.layer3[4].conv2.weight, plain.layer3[4].conv2.weight)
    assert torch.equal(dcn.layer1[0].conv2.weight, plain.layer1[0].conv2.weight)
    assert all(
        not m.conv_offset.weight.any() and not m.conv_offset.bias.any()
        for m in dcn.modules()
        if isinstance(m, DeformConv2dPack)
    )

    # every other mismatch is still an error
    extra = tmp_path / "extra.pth"
    torch.save({**state, "layer2.0.conv2.bias": torch.zeros(32)}, extra)
    with pytest.raises(RuntimeError, match=r"unexpected keys \['layer2.0.conv2.bias'\]"):
        quarter_r50(weights_path=str(extra), dcn_stages=DCN_C3_C5)
    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in state.items() if k != "layer2.0.conv2.weight"}, short)
    with pytest.raises(RuntimeError, match=r"missing keys \['layer2.0.conv2.weight'\]"):
        quarter_r50(weights_path=str(short), dcn_stages=DCN_C3_C5)
    # a DCN state dict with other dcn_stages (offsets for c4-c5 only) does not pass for c3-c5
    c4c5 = tmp_path / "c4c5.pth"
    torch.save(quarter_r50(dcn_stages=(False, False, True, True)).state_dict(), c4c5)
    with pytest.raises(RuntimeError, match=r"missing keys \['layer2.0.conv2.conv_offset.weight'"):
        quarter_r50(weights_path=str(c4c5), dcn_stages=DCN_C3_C5)
    # and offsets into a plain body are unexpected
    with pytest.raises(RuntimeError, match="unexpected keys"):
        quarter_r50(weights_path=str(c4c5))

    # a DCN checkpoint in the official (mmdet) naming, ``backbone.`` prefix, keeps its offsets
    with torch.no_grad():
        for m in dcn.modules():
            if isinstance(m, DeformConv2dPack):
                m.conv_offset.bias.normal_()
    official = tmp_path / "official.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in dcn.state_dict().items()}}, official)
    again = quarter_r50(weights_path=str(official), dcn_stages=DCN_C3_C5)
    assert torch.equal(again.layer2[0].conv2.conv_offset.bias, dcn.layer2[0].conv2.conv_offset.bias)


def test_imagenet_weights_load_into_dcn_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pretrained=True (the official config's torchvision://resnet101); the download is faked
    # with a plain body's state dict in torchvision's layout (``fc.*`` included, no offsets)
    plain = ResNetBackbone(depth=50, frozen_stages=-1)
    state = {**plain.state_dict(), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    monkeypatch.setattr(ResNetBackbone, "_download_imagenet", lambda self: dict(state))
    dcn = ResNetBackbone(depth=50, pretrained=True, dcn_stages=DCN_C3_C5)
    assert torch.equal(dcn.layer4[2].conv2.weight, plain.layer4[2].conv2.weight)
    assert not dcn.layer4[2].conv2.conv_offset.weight.any()
    assert not dcn.layer1[0].conv2.weight.requires_grad  # frozen_stages=1 still applied


def test_gradients_reach_the_offset_convs() -> None:
    bb = ResNetBackbone(depth=50, frozen_stages=-1, dcn_stages=DCN_C3_C5).train()
    x = torch.randn(2, 3, 64, 64)
    sum(f.pow(2).mean() for f in bb(x)).backward()
    offsets = {n: p for n, p in bb.named_parameters() if ".conv_offset." in n}
    assert len(offsets) == 2 * (4 + 6 + 3)
    for name, p in offsets.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    # one SGD step moves the sampling grid off the regular one and changes the output
    before = [f.detach() for f in bb.eval()(x)]
    with torch.no_grad():
        for p in offsets.values():
            p -= 1e-3 * p.grad / p.grad.abs().max()
    after = bb(x)
    assert bb.layer2[0].conv2.conv_offset.weight.any()
    assert not torch.equal(after[1], before[1]) and torch.equal(after[0], before[0])


def test_dcn_body_bf16_autocast_channels_last_close_to_fp32() -> None:
    bb = ResNetBackbone(depth=50, frozen_stages=-1, dcn_stages=DCN_C3_C5).eval()
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, DeformConv2dPack):
                m.conv_offset.bias.normal_(0.0, 1.0)  # really deform
    bb = bb.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = bb(x)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low = bb(x)
    for a, b in zip(low, ref):
        assert a.shape == b.shape and torch.isfinite(a).all()
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 0.05, rel


def test_r101_dcn_c3_c5_parameter_count() -> None:
    plain = n_params(ResNetBackbone(depth=101))
    dcn = n_params(ResNetBackbone(depth=101, dcn_stages=DCN_C3_C5))
    # one offset conv per block of layer2..4: 18 = 2 * 3 * 3 outputs over the 3x3 conv's width
    blocks_and_widths = [(4, 128), (23, 256), (3, 512)]
    extra = sum(n * (18 * c * 9 + 18) for n, c in blocks_and_widths)
    print(f"R101 body {plain:,}; R101-DCN (c3-c5) body {dcn:,} (+{extra:,})")
    assert dcn == plain + extra
    assert plain == 42_500_160  # torchvision's resnet101 without fc
    assert dcn == 43_786_332


def test_flop_count_includes_the_deformable_convs() -> None:
    """``model_complexity`` (the logged ``model/gflops`` and the bench) counts a deformable conv as
    its offset conv, its convolution and 4 multiply-adds per bilinear sample."""
    from knet_lightning.runtime.sweep import model_complexity

    conv = DeformConv2dPack(8, 16, 3, stride=2, padding=1)
    out_positions = 5 * 6  # a 10x12 input at stride 2
    offset_conv = 2 * 18 * 8 * 9 * out_positions
    gemm = 2 * 16 * 8 * 9 * out_positions
    sampling = 8 * 8 * 9 * out_positions
    got = model_complexity(conv, torch.randn(1, 8, 10, 12))["gflops"] * 1e9
    assert got == pytest.approx(offset_conv + gemm + sampling)


@pytest.mark.parametrize(("stride", "dilation", "deform_groups"), [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_sampled_deform_conv_equals_torchvision_with_gradients(stride: int, dilation: int, deform_groups: int) -> None:
    """The CPU path (bilinear sampling + matmul) against torchvision's ``deform_conv2d``: outputs
    and the gradients of input, offsets and weight, in float64, offsets reaching past the border."""
    from torchvision.ops import deform_conv2d

    from knet_lightning.models.dcn import sampled_deform_conv2d

    gen = torch.Generator().manual_seed(stride + 10 * dilation + 100 * deform_groups)
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64, generator=gen).requires_grad_()
    h_out, w_out = (9 - 1) // stride + 1, (11 - 1) // stride + 1
    offset = (3 * torch.randn(2, 18 * deform_groups, h_out, w_out, dtype=torch.float64, generator=gen)).requires_grad_()
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=gen).requires_grad_()
    args = ((stride, stride), (dilation, dilation), (dilation, dilation))
    ours = sampled_deform_conv2d(x, offset, weight, *args)
    ref = deform_conv2d(x, offset, weight, stride=args[0], padding=args[1], dilation=args[2])
    assert ours.shape == ref.shape == (2, 5, h_out, w_out)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(ours, (x, offset, weight), grad)
    expected = torch.autograd.grad(ref, (x, offset, weight), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_bench_dcn_tiny_reports_both_implementations(tmp_path: Path) -> None:
    """scripts/bench_dcn.py --tiny: both implementations timed on each conv, equal to 1e-5, and
    the model rows (the numbers of a tiny run mean nothing)."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench_dcn.json"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "bench_dcn.py"), "--tiny", "--repeats", "1",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [r["stage"] for r in record["ops"]] == ["c3", "c4"]
    for row in record["ops"]:
        assert all(row[f"{impl}_{kind}_ms"] > 0 for impl in ("torchvision", "sampled") for kind in ("forward", "train"))
        assert row["max_rel_diff"] < 1e-5
    assert [r["model"] for r in record["models"]] == ["K-Net R50-DCN (1/4 width)"]
    assert record["models"][0]["infer_ms"] > 0 and record["models"][0]["train_ms"] > 0
    assert record["models"][0]["infer_ratio"] == 1.0 and record["models"][0]["train_ratio"] == 1.0  # to itself
