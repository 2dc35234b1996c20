"""Semantic K-Net: decode heads, the semantic kernel update head and the full model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knet_lightning.models.outputs import StageOutput
from knet_lightning.models.semantic_head import ASPPHead, FCNHead, PSPHead, UPerHead
from knet_lightning.models.semantic_knet import (
    SemanticKernelUpdateHead,
    SemanticKNet,
    assemble_group_features,
)

TINY = dict(
    channels=32,
    aux_channels=16,
    feedforward_channels=64,
    updator_channels=16,
    num_heads=4,
)


def _fake_levels(b: int, h: int, w: int, channels: tuple[int, ...] = (8, 12, 16, 20)) -> list[Tensor]:
    """Backbone-like features at strides 4, 8, 16, 32."""
    return [torch.randn(b, c, h // s, w // s) for c, s in zip(channels, (4, 8, 16, 32))]


def _small_update_head() -> SemanticKernelUpdateHead:
    return SemanticKernelUpdateHead(in_channels=32, updator_channels=16, num_heads=4, feedforward_channels=64)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- decode heads


def test_fcn_head_logits_are_conv_seg_of_feature_with_class_kernels() -> None:
    head = FCNHead(in_channels=20, channels=8, num_classes=3, num_convs=2, concat_input=True).eval()
    feats = _fake_levels(2, 64, 96)
    out = head(feats)
    assert out.logits.shape == (2, 3, 2, 3)
    assert out.feature.shape == (2, 8, 2, 3)
    assert out.kernels.shape == (3, 8)
    # Kernels are conv_seg's weight itself (same storage, so the same gradient).
    assert out.kernels.data_ptr() == head.conv_seg.weight.data_ptr()
    expected = F.conv2d(out.feature, out.kernels[:, :, None, None], head.conv_seg.bias)
    torch.testing.assert_close(out.logits, expected)
    # Structure of mmseg FCN: two 3x3 convs then the 3x3 concat conv on in + channels.
    assert head.convs[0][0].weight.shape == (8, 20, 3, 3)
    assert head.convs[1][0].weight.shape == (8, 8, 3, 3)
    assert head.conv_cat is not None and head.conv_cat[0].weight.shape == (8, 28, 3, 3)


def test_fcn_aux_head_reads_c4_without_concat() -> None:
    head = FCNHead(in_channels=16, channels=4, num_classes=5, num_convs=1, concat_input=False, in_index=2)
    out = head(_fake_levels(1, 64, 64))
    assert head.conv_cat is None and len(head.convs) == 1
    assert out.logits.shape == (1, 5, 4, 4)
    with pytest.raises(ValueError, match=r"FCNHead: expected backbone feature 2 of shape \(B, 16"):
        head(_fake_levels(1, 64, 64, channels=(8, 12, 99, 20)))


def test_decode_head_dropout_only_on_logits_not_on_feature() -> None:
    head = FCNHead(in_channels=20, channels=8, num_classes=3, dropout=0.5).train()
    out = head(_fake_levels(2, 64, 64))
    # F is returned before Dropout2d: recomputing conv_seg on F differs only by the dropout.
    no_drop = F.conv2d(out.feature, out.kernels[:, :, None, None], head.conv_seg.bias)
    assert not torch.allclose(out.logits, no_drop)
    assert isinstance(head.dropout, nn.Dropout2d)


@pytest.mark.parametrize(("h", "w"), [(64, 64), (96, 160)])
def test_uper_head_fuses_at_stride_4(h: int, w: int) -> None:
    head = UPerHead(in_channels=(8, 12, 16, 20), channels=6, num_classes=4)
    out = head(_fake_levels(2, h, w))
    assert out.logits.shape == (2, 4, h // 4, w // 4)
    assert out.feature.shape == (2, 6, h // 4, w // 4)
    assert out.kernels.shape == (4, 6)
    # PPM on C5 (20 ch) + 4 pooled branches of 6 ch go into the bottleneck.
    assert head.bottleneck[0].weight.shape == (6, 20 + 4 * 6, 3, 3)
    assert head.fpn_bottleneck[0].weight.shape == (6, 4 * 6, 3, 3)


def test_uper_ppm_batch_of_one_with_batchnorm_gives_clear_error() -> None:
    head = UPerHead(in_channels=(8, 12, 16, 20), channels=6, num_classes=4).train()
    with pytest.raises(ValueError, match="pool scale 1 with nn.BatchNorm2d"):
        head(_fake_levels(1, 64, 64))
    head.eval()
    assert head(_fake_levels(1, 64, 64)).logits.shape == (1, 4, 16, 16)


def test_decode_head_parameter_counts_r50() -> None:
    # Hand-computed from the mmseg layer shapes (conv without bias + BN(2c), conv_seg with bias).
    fcn = FCNHead(in_channels=2048, channels=512, num_classes=150)
    assert _n_params(fcn) == (
        (2048 * 512 * 9 + 1024) + (512 * 512 * 9 + 1024) + (2560 * 512 * 9 + 1024) + (512 * 150 + 150)
    )
    assert _n_params(fcn) == 23_672_982
    uper = UPerHead(in_channels=(256, 512, 1024, 2048), channels=256, num_classes=150)
    assert _n_params(uper) == 13_807_254
    aux = FCNHead(in_channels=1024, channels=256, num_classes=150, num_convs=1, concat_input=False)
    assert _n_params(aux) == 2_398_358
    # PSPHead: 4 PPM 1x1 convs, bottleneck 3x3 over C5 + 4 x 512, conv_seg.
    psp = PSPHead(in_channels=2048, channels=512, num_classes=150)
    assert _n_params(psp) == 4 * (2048 * 512 + 1024) + (4096 * 512 * 9 + 1024) + (512 * 150 + 150) == 23_150_742
    # ASPPHead: image pool 1x1, one 1x1 and three dilated 3x3 branches, bottleneck over 5 x 512.
    aspp = ASPPHead(in_channels=2048, channels=512, num_classes=150)
    assert (
        _n_params(aspp)
        == (2 * (2048 * 512 + 1024) + 3 * (2048 * 512 * 9 + 1024) + (5 * 512 * 512 * 9 + 1024) + (512 * 150 + 150))
        == 42_288_278
    )
    assert [m.dilation for m in (b[0] for b in aspp.aspp_modules)] == [(1, 1), (12, 12), (24, 24), (36, 36)]
    assert [m.padding for m in (b[0] for b in aspp.aspp_modules)] == [(0, 0), (12, 12), (24, 24), (36, 36)]


@pytest.mark.parametrize("head_cls", [PSPHead, ASPPHead])
def test_pooling_heads_keep_the_level_size_and_expose_class_kernels(head_cls: type[nn.Module]) -> None:
    head = head_cls(in_channels=20, channels=16, num_classes=4, dropout=0.0).eval()
    levels = _fake_levels(2, 224, 288)
    out = head(levels)
    h, w = levels[3].shape[-2:]
    assert out.feature.shape == (2, 16, h, w) and out.logits.shape == (2, 4, h, w)
    expected = F.conv2d(out.feature, head.conv_seg.weight, head.conv_seg.bias)
    torch.testing.assert_close(out.logits, expected)
    assert out.kernels.data_ptr() == head.conv_seg.weight.data_ptr()
    # the pooled branches see the whole image: changing one corner moves logits everywhere
    moved = [f.clone() for f in levels]
    moved[3][:, :, 0, 0] += 5.0
    assert (head(moved).logits - out.logits)[:, :, -1, -1].abs().max() > 0


# --------------------------------------------------------------------------- assembling


def test_softmax_assembling_hand_computed() -> None:
    # Two classes, one channel, two pixels.
    # pixel 0: logits (0, 0)      -> weights (1/2, 1/2), feature 2
    # pixel 1: logits (ln 3, 0)   -> weights (3/4, 1/4), feature 4
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    feature = torch.tensor([[[[2.0, 4.0]]]])  # (1, 1, 1, 2)
    out = assemble_group_features(logits, feature)
    # Unnormalized sums: class 0: 1/2*2 + 3/4*4 = 4; class 1: 1/2*2 + 1/4*4 = 2.
    torch.testing.assert_close(out, torch.tensor([[[4.0], [2.0]]]))


def test_softmax_assembling_matches_reference_loop() -> None:
    b, n, c, h, w = 2, 3, 4, 5, 6
    logits = torch.randn(b, n, h, w) * 3
    feature = torch.randn(b, c, h, w)
    out = assemble_group_features(logits, feature)
    expected = torch.zeros(b, n, c)
    for bi in range(b):
        for u in range(h):
            for v in range(w):
                e = logits[bi, :, u, v].exp()
                weights = e / e.sum()
                expected[bi] += weights[:, None] * feature[bi, :, u, v][None, :]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.shape == (b, n, c)


def test_assembling_runs_in_fp32_under_autocast() -> None:
    logits = torch.randn(1, 3, 8, 8)
    feature = torch.randn(1, 4, 8, 8) * 1000
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = assemble_group_features(logits.bfloat16(), feature.bfloat16())
    assert out.dtype == torch.float32
    expected = assemble_group_features(logits.bfloat16().float(), feature.bfloat16().float())
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- update head


def test_chunked_updator_equals_updator_on_each_half() -> None:
    head = SemanticKernelUpdateHead(in_channels=512, updator_channels=256, feedforward_channels=32)
    assert head.num_chunks == 2
    assembled = torch.randn(2, 3, 512) * 10
    kernels = torch.randn(2, 3, 512)
    out = head.update_kernels(assembled, kernels)
    updator = head.kernel_update_conv
    expected = torch.cat(
        [
            updator(assembled[..., :256], kernels[..., :256]),
            updator(assembled[..., 256:], kernels[..., 256:]),
        ],
        dim=-1,
    )
    assert out.shape == (2, 3, 512)
    torch.testing.assert_close(out, expected)
    # The official code's view: rows of 256 (reshape(-1, 256)), one per half-vector.
    official = updator(assembled.reshape(-1, 1, 256), kernels.reshape(-1, 1, 256)).reshape(2, 3, 512)
    torch.testing.assert_close(out, official)


def test_unchunked_updator_when_widths_match() -> None:
    head = SemanticKernelUpdateHead(in_channels=32, updator_channels=32, num_heads=4, feedforward_channels=16)
    assembled, kernels = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    assert head.num_chunks == 1
    expected = head.kernel_update_conv(assembled, kernels)
    torch.testing.assert_close(head.update_kernels(assembled, kernels), expected)


def test_update_head_dynamic_conv_equals_per_image_conv2d_loop() -> None:
    head = _small_update_head().eval()
    feature = torch.randn(2, 32, 6, 10)
    kernels = torch.randn(2, 5, 32)
    prev = torch.randn(2, 5, 6, 10)
    new_kernels, logits, cls_logits = head(feature, kernels, prev)
    assert cls_logits is None  # kernel n is class n
    assert logits.shape == (2, 5, 6, 10) and new_kernels.shape == (2, 5, 32)
    x = head.feat_transform(feature)
    mask_kernels = head.fc_mask(head.mask_fcs(new_kernels))
    expected = torch.cat([F.conv2d(x[i : i + 1], mask_kernels[i][:, :, None, None]) for i in range(2)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_update_head_kernel_path_matches_manual_composition() -> None:
    head = _small_update_head().eval()
    feature, kernels, prev = torch.randn(1, 32, 4, 4), torch.randn(1, 3, 32), torch.randn(1, 3, 4, 4)
    new_kernels = head(feature, kernels, prev).kernels
    x = head.feat_transform(feature)
    k = head.update_kernels(assemble_group_features(prev, x), kernels)
    k = head.attention_norm(k + head.attention(k, k, k)[0])  # post-norm, residual outside attention
    k = head.ffn_norm(k + head.ffn(k))
    torch.testing.assert_close(new_kernels, k)


def test_update_head_resizes_previous_logits_and_checks_shapes() -> None:
    head = SemanticKernelUpdateHead(in_channels=32, updator_channels=16, num_heads=4, feedforward_channels=16)
    feature = torch.randn(1, 32, 8, 8)
    logits = head(feature, torch.randn(1, 3, 32), torch.randn(1, 3, 4, 4)).mask_logits
    assert logits.shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"kernels must be \(1, N, 32\)"):
        head(feature, torch.randn(1, 3, 16), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"mask_logits must be \(1, 3, h, w\)"):
        head(feature, torch.randn(1, 3, 32), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="updator_channels=24 must divide in_channels=32"):
        SemanticKernelUpdateHead(in_channels=32, updator_channels=24, num_heads=4)


def test_update_head_parameter_counts() -> None:
    # 256-wide (original UPerNet setting): feat_transform 65,792 + updator 463,104
    # + MHSA 263,168 + LN 512 + FFN 1,050,880 + LN 512 + mask FC 65,536 + LN 512 + fc_mask 65,792.
    assert _n_params(SemanticKernelUpdateHead(in_channels=256)) == 1_975_808
    # 512-wide kernels with the shared 256-wide updator (FCN setting): the updator stays 463,104.
    head = SemanticKernelUpdateHead(in_channels=512)
    assert _n_params(head.kernel_update_conv) == 463_104
    assert _n_params(head) == 4_403_968


def test_update_head_xavier_init() -> None:
    head = SemanticKernelUpdateHead(in_channels=64, updator_channels=32, num_heads=4, feedforward_channels=128)
    w = head.fc_mask.weight  # (64, 64): xavier bound sqrt(6 / 128)
    assert w.abs().max() <= math.sqrt(6 / 128) + 1e-6
    assert head.feat_transform.bias.abs().sum() == 0


# --------------------------------------------------------------------------- full model


@pytest.mark.parametrize(
    ("decode_head", "depth", "batch", "size", "num_stages", "train"),
    [
        ("uper", 18, 2, (96, 160), 3, True),
        ("uper", 18, 1, (64, 64), 1, False),
        ("fcn", 50, 2, (64, 96), 2, True),
        ("psp", 50, 2, (64, 96), 1, True),
        ("aspp", 50, 1, (64, 96), 1, False),
        ("fcn", 50, 1, (96, 160), 0, False),
    ],
)
def test_semantic_knet_output_shapes(
    decode_head: str, depth: int, batch: int, size: tuple[int, int], num_stages: int, train: bool
) -> None:
    model = SemanticKNet(
        num_classes=5, decode_head=decode_head, backbone_depth=depth, num_stages=num_stages, **TINY
    ).train(train)
    h, w = size
    stride = 4 if decode_head == "uper" else 8
    aux_stride = 16 if decode_head == "uper" else 8
    with torch.set_grad_enabled(train):
        outs = model(torch.randn(batch, 3, h, w))
    assert len(outs) == num_stages + 1
    for i, out in enumerate(outs):
        assert isinstance(out, StageOutput)
        assert out.mask_logits.shape == (batch, 5, h // stride, w // stride)
        assert out.cls_logits is None
        assert out.kernels.shape == (batch, 5, 32)
        if i == 0 and train:
            assert out.sem_logits is not None
            assert out.sem_logits.shape == (batch, 5, h // aux_stride, w // aux_stride)
        else:
            assert out.sem_logits is None
    # Stage-0 kernels are the decode head's conv_seg weights for every image.
    for b in range(batch):
        torch.testing.assert_close(outs[0].kernels[b], model.decode_head.conv_seg.weight[:, :, 0, 0])


def test_semantic_knet_defaults_and_bad_input() -> None:
    model = SemanticKNet(num_classes=150, backbone_depth=50)
    assert model.channels == 256 and model.output_stride == 4
    assert len(model.kernel_update_heads) == 3
    # mmseg trains every backbone stage.
    assert all(p.requires_grad for p in model.backbone.parameters())
    # ResNet-50 23,508,032 + UPerHead 13,807,254 + aux FCN 2,398,358 + 3 x 1,975,808.
    assert _n_params(model) == 45_641_068
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        SemanticKNet(num_classes=1, backbone_depth=18)
    with pytest.raises(ValueError, match=r"decode_head must be one of \('fcn', 'psp', 'aspp', 'uper'\)"):
        SemanticKNet(num_classes=3, decode_head="deeplab", backbone_depth=18)
    tiny = SemanticKNet(num_classes=3, backbone_depth=18, num_stages=1, **TINY).eval()
    # any input size, as MMSegmentation's whole-image inference
    assert tiny(torch.randn(1, 3, 64, 70))[-1].mask_logits.shape == (1, 3, 16, 18)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        tiny(torch.randn(1, 1, 64, 64))


def test_fcn_default_width_is_512() -> None:
    model = SemanticKNet(num_classes=150, decode_head="fcn", backbone_depth=50, num_stages=1)
    assert model.channels == 512 and model.output_stride == 8
    assert model.kernel_update_heads[0].num_chunks == 2


def _semantic_loss(outs: list[StageOutput], labels: Tensor, aux_weight: float = 0.4) -> Tensor:
    size = labels.shape[-2:]
    loss = sum(
        F.cross_entropy(F.interpolate(o.mask_logits, size=size, mode="bilinear"), labels, ignore_index=255)
        for o in outs
    )
    aux = outs[0].sem_logits
    if aux is not None:
        loss = loss + aux_weight * F.cross_entropy(
            F.interpolate(aux, size=size, mode="bilinear"), labels, ignore_index=255
        )
    return loss


def test_gradients_reach_all_trainable_parameters() -> None:
    model = SemanticKNet(num_classes=3, backbone_depth=18, num_stages=2, **TINY).train()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[:, :4] = 255
    _semantic_loss(model(images), labels).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0]
    assert not zero
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Softmax assembling is differentiable: the stage-0 logits get gradient from stage 1 too.
    model.zero_grad()
    outs = model(images)
    outs[1].mask_logits.sum().backward()
    assert model.decode_head.conv_seg.bias.grad is not None
    assert model.decode_head.conv_seg.bias.grad.abs().sum() > 0


def test_tiny_model_overfits_toy_two_class_image() -> None:
    torch.manual_seed(0)
    model = SemanticKNet(num_classes=2, backbone_depth=18, num_stages=2, dropout=0.0, **TINY).train()
    h = w = 64
    labels = torch.zeros(2, h, w, dtype=torch.long)
    labels[0, 16:48, 16:48] = 1
    labels[1, :, 32:] = 1
    images = torch.randn(2, 3, h, w) * 0.1 + labels[:, None].float() * 1.5 - 0.75
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    losses = []
    # 60 steps: after 30, the eval-mode prediction (BN running statistics, momentum 0.1, still 4 %
    # the initial ones) depended on the CPU's kernels: 88 % correct under AVX2 dispatch
    for _ in range(60):
        opt.zero_grad()
        loss = _semantic_loss(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    model.eval()
    with torch.no_grad():
        pred = F.interpolate(model(images)[-1].mask_logits, size=(h, w), mode="bilinear").argmax(1)
    assert (pred == labels).float().mean() > 0.95


def test_semantic_evaluation_reads_each_image_unpadded() -> None:
    """MMSegmentation's whole-image inference runs each image at its own size; a padded batch
    would change every logit (the PPM pooling, the kernels' group features). The semantic task
    runs the network per image, unpadded, whatever the collate function padded."""
    from knet_lightning.postprocess.merge import semantic_inference
    from knet_lightning.tasks import build_task

    net = SemanticKNet(num_classes=3, backbone_depth=18, num_stages=1, **TINY).eval()
    task = build_task("semantic", num_classes=3, num_things=0, num_proposals=3, num_stages=1)
    a, b = torch.randn(3, 40, 56), torch.randn(3, 64, 64)
    images = torch.zeros(2, 3, 64, 64)
    images[0, :, :40, :56], images[1] = a, b
    batch = {"images": images, "image_sizes": [(40, 56), (64, 64)],
             "targets": [{"orig_size": (80, 112)}, {"orig_size": (64, 64)}]}  # fmt: skip
    parts = task.network_batches(batch)
    assert [tuple(p["images"].shape[-2:]) for p in parts] == [(40, 56), (64, 64)]
    with torch.no_grad():
        preds = [p for part in parts for p in task.predict(net(part["images"])[-1], part)]
        for image, pred, out in zip((a, b), preds, ((80, 112), (64, 64))):
            alone = net(image[None])[-1].mask_logits[0]
            assert torch.equal(pred, semantic_inference(alone, image.shape[-2:], image.shape[-2:], out))
        alone_a = net(a[None])[-1].mask_logits[0]
        h, w = alone_a.shape[-2:]
        assert not torch.allclose(net(images)[-1].mask_logits[0][:, :h, :w], alone_a, atol=1e-3)
    # a batch without padding, and the detection tasks, run as they are
    single = {**batch, "images": images[1:], "image_sizes": [(64, 64)], "targets": batch["targets"][1:]}
    assert task.network_batches(single) == [single]
    pan = build_task("panoptic", num_classes=3, num_things=2, num_proposals=2, num_stages=1)
    assert pan.network_batches(batch) == [batch]
