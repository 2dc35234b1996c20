"""Model tests: parameter counts, shapes, the updator / assembling maths, gradients, frozen parts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork

from knet_lightning.models.backbone import FPN
from knet_lightning.models.kernel_head import KernelHead
from knet_lightning.models.kernel_update import (
    KernelUpdateHead,
    KernelUpdator,
    dynamic_conv,
    group_feature_assembling,
)
from knet_lightning.models.knet import KNet
from knet_lightning.models.neck import SemanticFPNNeck, SinePositionalEncoding
from knet_lightning.models.outputs import StageOutput
from knet_lightning.models.resnet import ResNetBackbone


def tiny_knet(**kw: object) -> KNet:
    cfg: dict[str, object] = dict(
        num_things=3,
        num_stuff=2,
        num_proposals=6,
        num_stages=2,
        backbone_depth=18,
        channels=32,
        num_groups=8,
        feedforward_channels=64,
        num_heads=4,
    )
    cfg.update(kw)
    return KNet(**cfg)  # type: ignore[arg-type]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- parameter counts


def test_param_counts_r50_panoptic_and_instance_match_official() -> None:
    pan = KNet(num_things=80, num_stuff=53)
    assert n_params(pan.backbone) == 23_508_032
    assert n_params(pan.fpn) == 3_344_384
    assert n_params(pan.neck) == 4_264_448
    assert n_params(pan.kernel_head) == 191_877
    assert n_params(pan.update_heads[0]) == 2_076_037
    assert n_params(pan.update_heads[0].kernel_update_conv) == 463_104
    assert n_params(pan.update_heads[0].ffn) == 1_050_880
    assert n_params(pan) == 37_536_852
    assert pan.num_classes == 133 and pan.num_kernels == 153
    # Separate weights per stage (recursive=False).
    assert pan.update_heads[0].fc_cls.weight is not pan.update_heads[1].fc_cls.weight
    del pan

    ins = KNet(num_things=80, num_stuff=0)
    assert n_params(ins.kernel_head) == 178_256
    assert n_params(ins.update_heads[0]) == 2_062_416
    assert n_params(ins) == 37_482_368
    assert ins.num_classes == 80 and ins.num_kernels == 100


def test_param_count_scales_with_n_only_through_init_kernels() -> None:
    a = tiny_knet(num_proposals=6)
    b = tiny_knet(num_proposals=11)
    assert n_params(b) - n_params(a) == 5 * 32


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("task", "num_proposals", "num_stages", "batch", "hw"),
    [
        ("panoptic", 6, 2, 1, (96, 160)),
        ("panoptic", 9, 3, 3, (64, 64)),
        ("instance", 5, 1, 3, (160, 96)),
        ("instance", 4, 0, 1, (32, 32)),
    ],
)
def test_knet_output_shapes(task: str, num_proposals: int, num_stages: int, batch: int, hw: tuple[int, int]) -> None:
    # an instance network has no stuff kernels (the instance configs' net.num_stuff=0)
    model = tiny_knet(num_stuff=2 if task == "panoptic" else 0, num_proposals=num_proposals, num_stages=num_stages)
    h, w = hw
    outs = model(torch.randn(batch, 3, h, w))
    num_classes = 5 if task == "panoptic" else 3
    n = num_proposals + (2 if task == "panoptic" else 0)
    assert model.num_kernels == n and model.num_classes == num_classes
    assert len(outs) == num_stages + 1
    for s, out in enumerate(outs):
        assert isinstance(out, StageOutput)
        assert out.mask_logits.shape == (batch, n, h // 4, w // 4)
        assert out.kernels.shape == (batch, n, 32)
        if s == 0:
            assert out.cls_logits is None
            assert out.sem_logits is not None and out.sem_logits.shape == (batch, num_classes, h // 8, w // 8)
        else:
            assert out.cls_logits is not None and out.cls_logits.shape == (batch, n, num_classes)
            assert out.sem_logits is None


def test_instance_config_ignores_stuff_on_a_panoptic_data_set(tmp_path: Path) -> None:
    """model=knet_instance on a data set with stuff classes: a network without stuff kernels and
    a criterion that keeps stuff labels valid but learns none of them."""
    import hydra
    from cli_utils import compose_cfg, tiny_overrides

    cfg = compose_cfg(tmp_path, tiny_overrides("model=knet_instance"))
    assert cfg.data.num_stuff > 0
    model = hydra.utils.instantiate(cfg.model.net)
    things = cfg.data.num_things
    assert model.num_classes == things and model.num_kernels == cfg.model.num_proposals
    assert model.kernel_head.conv_seg.out_channels == things
    criterion = hydra.utils.instantiate(cfg.model.criterion)
    assert criterion.num_stuff == cfg.data.num_stuff and criterion.num_classes == things
    assert criterion.num_stuff_kernels == 0


@pytest.mark.parametrize(
    ("kwargs", "shape", "match"),
    [
        ({}, (1, 3, 48, 64), "multiples of 32"),
        ({}, (1, 1, 64, 64), r"\(B, 3, H, W\)"),
        ({"num_stuff": -1}, None, "num_stuff"),
        ({"num_things": 0}, None, "num_things"),
        ({"backbone_depth": 42}, None, "depth"),
        ({"num_groups": 5}, None, "num_groups"),
    ],
)
def test_knet_bad_input_raises_clear_error(
    kwargs: dict[str, object], shape: tuple[int, ...] | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        model = tiny_knet(**kwargs)
        assert shape is not None
        model(torch.randn(*shape))


# --------------------------------------------------------------------------- stage 0 and the updator maths


def test_group_feature_assembling_is_an_unnormalized_sum_over_the_binary_mask() -> None:
    feats = torch.arange(2 * 2 * 2, dtype=torch.float32).view(1, 2, 2, 2)  # c0 = [[0,1],[2,3]], c1 = [[4,5],[6,7]]
    logits = torch.tensor([[[[3.0, -3.0], [0.1, 5.0]], [[-1.0, -2.0], [-3.0, -4.0]]]], requires_grad=True)
    out = group_feature_assembling(logits, feats, hard_mask_thr=0.5)
    # Kernel 0 covers pixels (0,0), (1,0), (1,1): sums, not means, and the 0.1 logit (p=0.525) counts fully.
    assert torch.equal(out, torch.tensor([[[0.0 + 2 + 3, 4.0 + 6 + 7], [0.0, 0.0]]]))
    # A hard mask: no gradient path into the mask logits.
    assert not out.requires_grad
    # Masks at another size are resized bilinearly first.
    big = logits.detach().repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    assert torch.equal(group_feature_assembling(big, feats), out)


def test_group_feature_assembling_runs_in_fp32_under_autocast() -> None:
    feats = torch.full((1, 4, 8, 8), 3.3)
    logits = torch.ones(1, 2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = group_feature_assembling(logits, feats)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.full((1, 2, 4), 3.3 * 64))


def test_dynamic_conv_einsum_equals_per_image_conv2d_loop() -> None:
    kernels = torch.randn(3, 5, 4)
    feats = torch.randn(3, 4, 6, 7)
    loop = torch.cat([F.conv2d(feats[b : b + 1], kernels[b][..., None, None]) for b in range(3)])
    assert torch.allclose(dynamic_conv(kernels, feats), loop, atol=1e-5)


def _layer_norm(x: Tensor, ln: nn.LayerNorm) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def test_kernel_updator_matches_the_formulas() -> None:
    c = 8
    upd = KernelUpdator(c, c, c)
    with torch.no_grad():  # non-trivial LN affines so that a swapped norm would show
        for p in upd.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p))
    fk, k = torch.randn(2, 5, c), torch.randn(2, 5, c)

    def lin(x: Tensor, layer: nn.Linear) -> Tensor:
        return x @ layer.weight.t() + layer.bias

    f_all, k_all = lin(fk, upd.dynamic_layer), lin(k, upd.input_layer)
    f_in, f_out = f_all[..., :c], f_all[..., c:]
    k_in, k_out = k_all[..., :c], k_all[..., c:]
    fg = f_in * k_in
    g_f = torch.sigmoid(_layer_norm(lin(fg, upd.update_gate), upd.norm_in))
    g_k = torch.sigmoid(_layer_norm(lin(fg, upd.input_gate), upd.input_norm_in))
    k_tilde = g_f * _layer_norm(f_out, upd.norm_out) + g_k * _layer_norm(k_out, upd.input_norm_out)
    expected = torch.relu(_layer_norm(lin(k_tilde, upd.fc_layer), upd.fc_norm))

    out = upd(fk, k)
    assert out.shape == (2, 5, c)
    assert torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="last dim 8"):
        upd(torch.randn(2, 5, 7), k)


def test_kernel_update_head_matches_manual_pipeline_and_init() -> None:
    c, n = 16, 5
    head = KernelUpdateHead(num_classes=4, channels=c, feedforward_channels=32, num_heads=4).eval()
    assert torch.allclose(head.fc_cls.bias, torch.full((4,), -math.log(99.0)))
    feats, kernels, masks = torch.randn(2, c, 6, 8), torch.randn(2, n, c), torch.randn(2, n, 6, 8)
    out = head(feats, kernels, masks)

    x = head.feat_transform(feats)
    w = (masks.sigmoid() > 0.5).float()
    fk = (w[:, :, None] * x[:, None]).sum((-1, -2))
    k = head.kernel_update_conv(fk, kernels)
    k = head.attention_norm(k + head.attention(k, k, k)[0])
    k = head.ffn_norm(k + head.ffn[3](torch.relu(head.ffn[0](k))))
    cls = head.fc_cls(torch.relu(head.cls_fcs[1](head.cls_fcs[0](k))))
    m = head.fc_mask(torch.relu(head.mask_fcs[1](head.mask_fcs[0](k))))
    mask_logits = torch.stack([F.conv2d(x[b : b + 1], m[b][..., None, None])[0] for b in range(2)])

    assert torch.allclose(out.kernels, k, atol=1e-5)
    assert torch.allclose(out.cls_logits, cls, atol=1e-5)
    assert torch.allclose(out.mask_logits, mask_logits, atol=1e-4)
    assert out.mask_logits.shape == (2, n, 6, 8)


def test_kernel_update_head_init_is_the_official_one() -> None:
    """Official ``KernelUpdateHead.init_weights`` (det): Xavier-uniform on every parameter with
    dim > 1, fc_cls bias at the 0.01 prior, and the ConvModule ``feat_transform``'s bias at 0."""
    c = 256
    head = KernelUpdateHead(num_classes=4, channels=c, feedforward_channels=2048, num_heads=8)
    assert torch.count_nonzero(head.feat_transform.bias) == 0
    for name, p in head.named_parameters():
        if p.dim() > 1:
            fan_out, fan_in = p.shape[0] * p[0][0].numel(), p.shape[1] * p[0][0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform_
            assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound, name
    assert torch.equal(head.attention_norm.weight, torch.ones(c))  # 1-D: the constructor's


def test_kernel_head_initial_kernels_and_stuff_kernels() -> None:
    c, p = 8, 4
    head = KernelHead(num_proposals=p, num_things=3, num_stuff=2, channels=c, num_groups=2).eval()
    assert torch.allclose(head.conv_seg.bias, torch.full((5,), -math.log(99.0)))
    loc_in, sem_in = torch.randn(2, c, 5, 6), torch.randn(2, c, 5, 6)
    out = head(loc_in, sem_in)

    loc, sem = head.loc_convs(loc_in), head.seg_convs(sem_in)
    feats = loc + sem
    m0 = head.init_kernels(loc)
    sem_logits = head.conv_seg(sem)
    w = (m0.sigmoid() > 0.5).float()
    k0 = head.init_kernels.weight.flatten(1)[None] + (w[:, :, None] * feats[:, None]).sum((-1, -2))

    assert torch.allclose(out.features, feats)
    assert torch.allclose(out.sem_logits, sem_logits)
    assert out.kernels.shape == (2, p + 2, c) and out.mask_logits.shape == (2, p + 2, 5, 6)
    assert torch.allclose(out.kernels[:, :p], k0, atol=1e-5)
    assert torch.allclose(out.mask_logits[:, :p], m0)
    # Stuff: the conv_seg stuff rows are the kernels, the conv_seg stuff channels the masks.
    assert torch.equal(out.kernels[:, p:], head.conv_seg.weight[3:].flatten(1)[None].expand(2, -1, -1))
    assert torch.equal(out.mask_logits[:, p:], sem_logits[:, 3:])


def test_stage0_outputs_are_head_outputs_upsampled() -> None:
    model = tiny_knet().eval()
    x = torch.randn(1, 3, 64, 96)
    loc, sem = model.neck(model.fpn(model.backbone(x)))
    head = model.kernel_head(loc, sem)
    outs = model(x)
    up = F.interpolate(head.mask_logits, scale_factor=2.0, mode="bilinear", align_corners=False)
    assert torch.allclose(outs[0].mask_logits, up)
    assert torch.allclose(outs[0].kernels, head.kernels)
    assert outs[0].sem_logits is not None and torch.allclose(outs[0].sem_logits, head.sem_logits)
    # Stage 1 gathers with the stride-8 masks.
    s1 = model.update_heads[0](head.features, head.kernels, head.mask_logits)
    assert torch.allclose(outs[1].kernels, s1.kernels, atol=1e-5)


# --------------------------------------------------------------------------- neck / FPN / PE


def test_sine_positional_encoding_matches_mmdet_formula() -> None:
    pe = SinePositionalEncoding(num_feats=8)
    h, w = 3, 5
    out = pe(torch.zeros(2, 1, h, w))
    assert out.shape == (2, 16, h, w)
    # mmdet: cumsum of the all-valid mask, normalized to 2*pi, dim_t = T^(2*(i//2)/F), interleaved sin/cos, (y, x).
    mask = torch.ones(2, h, w)
    y = mask.cumsum(1) / (h + 1e-6) * 2 * math.pi
    x = mask.cumsum(2) / (w + 1e-6) * 2 * math.pi
    dim_t = 10000.0 ** (2 * (torch.arange(8) // 2) / 8)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    ref = torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.isclose(out[0, 0, 1, 0], torch.tensor(math.sin(2 / 3 * 2 * math.pi)), atol=1e-5)


def test_semantic_fpn_neck_structure_and_stride() -> None:
    neck = SemanticFPNNeck(256, 256, 32)
    assert n_params(neck) == 4_264_448
    n3 = sum(1 for m in neck.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert n3 == 7 and all(m.bias is None for m in neck.modules() if isinstance(m, nn.Conv2d))
    small = SemanticFPNNeck(16, 16, 4)
    feats = [torch.randn(2, 16, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    loc, sem = small(feats)
    assert loc.shape == sem.shape == (2, 16, 8, 12)
    # The PE is added at P5 only: constant inputs still give a spatially varying output.
    const = [torch.zeros_like(f) for f in feats]
    loc_c, _ = small(const)
    assert loc_c.std(dim=(-1, -2)).max() > 0


def test_fpn_matches_torchvision_fpn_with_shared_weights() -> None:
    ours = FPN([8, 16, 32, 64], 12)
    assert all(m.bias is not None for m in ours.modules() if isinstance(m, nn.Conv2d))
    tv = FeaturePyramidNetwork([8, 16, 32, 64], 12)
    with torch.no_grad():
        for i in range(4):
            tv.inner_blocks[i][0].weight.copy_(ours.lateral_convs[i].weight)
            tv.inner_blocks[i][0].bias.copy_(torch.randn(12))
            ours.lateral_convs[i].bias.copy_(tv.inner_blocks[i][0].bias)
            tv.layer_blocks[i][0].weight.copy_(ours.fpn_convs[i].weight)
            tv.layer_blocks[i][0].bias.copy_(ours.fpn_convs[i].bias)
    feats = [torch.randn(1, c, 24 // 2**i, 40 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    expected = list(tv({str(i): f for i, f in enumerate(feats)}).values())
    for a, b in zip(ours(feats), expected):
        assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------- backbone freezing, BN, weights


def test_frozen_stages_and_norm_eval() -> None:
    bb = ResNetBackbone(depth=18, frozen_stages=1, norm_eval=True)
    bb.train()
    frozen = [*bb.conv1.parameters(), *bb.bn1.parameters(), *bb.layer1.parameters()]
    assert all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in [*bb.layer2.parameters(), *bb.layer4.parameters()])
    assert all(not m.training for m in bb.modules() if isinstance(m, nn.BatchNorm2d))
    before = bb.layer3[0].bn1.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64))
    assert torch.equal(bb.layer3[0].bn1.running_mean, before)

    # modules_in_eval_mode() lists exactly the modules train() keeps in eval mode
    assert {id(m) for m in bb.modules_in_eval_mode()} == {id(m) for m in bb.modules() if not m.training}

    free = ResNetBackbone(depth=18, frozen_stages=-1, norm_eval=False).train()
    assert all(p.requires_grad for p in free.parameters())
    assert free.modules_in_eval_mode() == []
    assert all(m.training for m in free.modules() if isinstance(m, nn.BatchNorm2d))
    feats = free(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == free.out_channels == [64, 128, 256, 512]
    assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]


@pytest.mark.parametrize(("builder", "dilated"), [(resnet18, False), (resnet50, False), (resnet50, True)])
def test_plain_body_equals_torchvision_resnet(builder: object, dilated: bool) -> None:
    # torchvision's state dict (ImageNet weights' layout) loads strictly and gives the same C2..C5;
    # torchvision's replace_stride_with_dilation is mmseg's D8 with contract_dilation.
    tv = builder(replace_stride_with_dilation=[False, dilated, dilated]).eval()  # type: ignore[operator]
    ours = ResNetBackbone(
        depth=50 if builder is resnet50 else 18,
        frozen_stages=-1,
        strides=(1, 2, 1, 1) if dilated else (1, 2, 2, 2),
        dilations=(1, 1, 2, 4) if dilated else (1, 1, 1, 1),
    ).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, strict=True)
    x = torch.randn(1, 3, 72, 88)
    expected = IntermediateLayerGetter(tv, {f"layer{i}": str(i) for i in range(1, 5)})(x).values()
    for a, b in zip(ours(x), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resnet_v1c_deep_stem_and_contracted_dilation() -> None:
    bb = ResNetBackbone(depth=50, deep_stem=True, frozen_stages=0, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    # mmseg ResNetV1c: stem.0/3/6 convs 3->32->32->64 (the first strided), BN at 1/4/7
    convs = [bb.stem[i] for i in (0, 3, 6)]
    assert [tuple(c.weight.shape) for c in convs] == [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1)]
    assert [type(bb.stem[i]) for i in (1, 4, 7)] == [nn.BatchNorm2d] * 3
    assert not hasattr(bb, "conv1")
    # torchvision's 23,508,032 minus the 7x7 stem (9,408 + 128) plus the deep stem (28,768)
    assert sum(p.numel() for p in bb.parameters()) == 23_527_264
    # contract_dilation: a dilated stage's first block uses half its dilation
    assert [blk.conv2.dilation for blk in bb.layer3[:2]] == [(1, 1), (2, 2)]
    assert [blk.conv2.dilation for blk in bb.layer4[:2]] == [(2, 2), (4, 4)]
    assert all(not p.requires_grad for p in bb.stem.parameters())  # frozen_stages=0 freezes the stem
    feats = bb.train()(torch.randn(2, 3, 72, 88))
    assert [tuple(f.shape[-2:]) for f in feats] == [(18, 22), (9, 11), (9, 11), (9, 11)]
    uncontracted = ResNetBackbone(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=False)
    assert uncontracted.layer4[0].conv2.dilation == (4, 4)


def test_backbone_width_and_option_errors() -> None:
    half = ResNetBackbone(depth=18, frozen_stages=-1, base_channels=32)
    assert half.out_channels == [32, 64, 128, 256]
    assert [f.shape[1] for f in half(torch.randn(1, 3, 64, 64))] == [32, 64, 128, 256]
    with pytest.raises(ValueError, match="not for ResNet-18 with base_channels=32"):
        ResNetBackbone(depth=18, base_channels=32, pretrained=True)
    with pytest.raises(ValueError, match="not for ResNetV1c-34"):
        ResNetBackbone(depth=34, deep_stem=True, pretrained=True)
    with pytest.raises(ValueError, match="need a Bottleneck ResNet"):
        ResNetBackbone(depth=18, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    with pytest.raises(ValueError, match="4 values each"):
        ResNetBackbone(depth=18, strides=(1, 2, 2))


def test_resnet_v1c_pretrained_reads_the_openmmlab_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # open-mmlab://resnet50_v1c of the official semantic configs; the download is faked
    src = ResNetBackbone(depth=50, deep_stem=True, frozen_stages=-1)
    urls: list[str] = []

    def fake_download(url: str, **kwargs: object) -> dict[str, object]:
        urls.append(url)
        assert kwargs.get("weights_only") is True
        return {"state_dict": {**src.state_dict(), "fc.weight": torch.zeros(1000, 2048)}, "meta": {}}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    dst = ResNetBackbone(depth=50, deep_stem=True, pretrained=True)
    assert urls == ["https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth"]
    assert torch.equal(dst.stem[3].weight, src.stem[3].weight)


def test_backbone_weights_path_round_trip_and_errors(tmp_path: Path) -> None:
    src = ResNetBackbone(depth=18, frozen_stages=-1)
    state = {**src.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    good = tmp_path / "r18.pth"
    torch.save(state, good)
    dst = ResNetBackbone(depth=18, weights_path=str(good))
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert not dst.conv1.weight.requires_grad  # freezing still applied after loading

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ResNetBackbone(depth=18, weights_path=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pth"):
        ResNetBackbone(depth=18, weights_path=str(junk))
    with pytest.raises(RuntimeError, match=r"r18\.pth.*this ResNet-34"):
        ResNetBackbone(depth=34, weights_path=str(good))


# --------------------------------------------------------------------------- gradients and optimizer groups


def test_gradients_reach_every_trainable_parameter_and_frozen_stay_frozen() -> None:
    model = tiny_knet(num_stages=2)
    model.train()
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for m in model.neck.modules() if isinstance(m, nn.GroupNorm))
    # Bias the initial masks so that every kernel has a non-empty binarized mask; otherwise
    # F^K = 0 and dynamic_layer.weight legitimately gets a zero gradient.
    with torch.no_grad():
        model.kernel_head.init_kernels.weight.abs_()
    outs = model(torch.randn(2, 3, 64, 64))
    loss = sum(o.mask_logits.sigmoid().mean() for o in outs)
    loss = loss + sum(o.cls_logits.sigmoid().mean() for o in outs[1:] if o.cls_logits is not None)
    loss = loss + outs[0].sem_logits.sigmoid().mean()  # type: ignore[union-attr]
    loss.backward()

    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected_frozen = {
        n for n, _ in model.named_parameters() if n.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))
    }
    assert frozen == expected_frozen and frozen
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
        else:
            assert p.grad is None, name


def test_forward_under_cpu_autocast_keeps_kernels_fp32() -> None:
    model = tiny_knet(num_stages=1).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model(torch.randn(1, 3, 64, 64))
    assert outs[0].kernels.dtype == torch.float32
    assert all(torch.isfinite(o.mask_logits.float()).all() for o in outs)


def test_frozen_modules_note_replaces_lightnings_warning_only_for_the_backbones_own(caplog) -> None:
    import warnings

    from knet_lightning.training.callbacks import FrozenModulesNote

    module = nn.Module()
    module.net = nn.Module()
    module.net.backbone = ResNetBackbone(depth=18, frozen_stages=1, norm_eval=True)
    module.net.head = nn.Linear(2, 2)
    n = len([m for m in module.modules() if not m.training])
    assert n == len(module.net.backbone.modules_in_eval_mode()) > 0

    def lightning_warns(count: int) -> list:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with caplog.at_level("INFO", logger="knet_lightning.training.callbacks"):
                FrozenModulesNote().on_fit_start(None, module)
            warnings.warn(
                f"Found {count} module(s) in eval mode at the start of training. This may lead to ...", stacklevel=1
            )
        return seen

    assert lightning_warns(n) == []
    assert (
        f"{n} backbone modules stay in eval mode while training, by design: frozen_stages=1 and norm_eval"
        in caplog.text
    )
    module.net.head.eval()  # not the backbone's: Lightning's warning stays
    assert len(lightning_warns(n + 1)) == 1
