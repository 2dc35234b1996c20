"""KNetCriterion (instance / panoptic) and SemanticCriterion on small synthetic tensors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from knet_lightning.criterion import HungarianMatcher, KNetCriterion, SemanticCriterion, mask_bce_loss
from knet_lightning.models.outputs import StageOutput

LN2 = math.log(2.0)
IMG = 16  # image size; stride-4 maps are 4x4
H4 = IMG // 4


def region(rows: slice, cols: slice, size: tuple[int, int] = (IMG, IMG)) -> torch.Tensor:
    m = torch.zeros(size, dtype=torch.bool)
    m[rows, cols] = True
    return m


TOP = region(slice(0, 8), slice(0, IMG))  # 8 stride-4 pixels
BOTTOM = region(slice(8, IMG), slice(0, IMG))
BOTTOM_LEFT = region(slice(8, IMG), slice(0, 8))  # 4 stride-4 pixels


def target(segments: list[tuple[int, torch.Tensor]], crowd: list[bool] | None = None) -> dict[str, Any]:
    size = segments[0][1].shape if segments else (IMG, IMG)
    masks = torch.stack([m for _, m in segments]) if segments else torch.zeros((0, *size), dtype=torch.bool)
    return {
        "masks": masks,
        "labels": torch.tensor([c for c, _ in segments], dtype=torch.long),
        "iscrowd": torch.tensor(crowd if crowd is not None else [False] * len(segments), dtype=torch.bool),
    }


def make_outputs(
    batch: int, num_kernels: int, num_classes: int, num_stages: int, zeros: bool = False
) -> list[StageOutput]:
    """Leaf tensors (requires_grad) for every stage; zeros gives hand-computable losses."""
    gen = torch.zeros if zeros else torch.randn

    def leaf(*shape: int) -> torch.Tensor:
        return gen(*shape).requires_grad_()

    outs = [
        StageOutput(leaf(batch, num_kernels, H4, H4), None, leaf(batch, num_kernels, 8), leaf(batch, num_classes, 2, 2))
    ]
    for _ in range(num_stages):
        outs.append(
            StageOutput(
                leaf(batch, num_kernels, H4, H4), leaf(batch, num_kernels, num_classes), leaf(batch, num_kernels, 8)
            )
        )
    return outs


def crit_panoptic(**kw: Any) -> KNetCriterion:
    return KNetCriterion(num_things=2, num_stuff=2, num_proposals=3, **kw)


def crit_instance(**kw: Any) -> KNetCriterion:
    return KNetCriterion(num_things=2, num_stuff=0, num_proposals=2, stuff_kernels=False, **kw)


def total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(losses.values())  # type: ignore[return-value]


# --------------------------------------------------------------------------- keys


def test_key_sets_for_two_stages() -> None:
    tgts = [target([(0, TOP), (2, BOTTOM)])]
    pan = crit_panoptic()(make_outputs(1, 5, 4, 2), tgts)
    assert set(pan) == {
        "s0.mask",
        "s0.dice",
        "s0.seg",
        "s0.rank",
        "s1.cls",
        "s1.mask",
        "s1.dice",
        "s1.rank",
        "s2.cls",
        "s2.mask",
        "s2.dice",
        "s2.rank",
    }
    ins = crit_instance()(make_outputs(1, 2, 2, 2), [target([(0, TOP)])])
    assert set(ins) == {"s0.mask", "s0.dice", "s0.seg", "s1.cls", "s1.mask", "s1.dice", "s2.cls", "s2.mask", "s2.dice"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in {**pan, **ins}.values())


# --------------------------------------------------------------------------- hand-computed values


def test_panoptic_zero_logits_hand_values() -> None:
    """All logits 0 (p = 0.5): every term has a closed form."""
    tgts = [target([(0, TOP), (2, BOTTOM_LEFT)])]  # thing class 0, stuff class 2 (k=0); class 3 absent
    losses = crit_panoptic()(make_outputs(1, 5, 4, 1, zeros=True), tgts)
    # Stage 0: only the thing (stuff never enters the stage-0 mask losses).
    assert losses["s0.mask"].item() == pytest.approx(LN2, rel=1e-6)
    dice_thing = 1 - 2 * 4 / (4.001 + 8.001)  # a = 0.5*8, sum p^2 = 16/4, sum t^2 = 8
    assert losses["s0.dice"].item() == pytest.approx(4.0 * dice_thing, rel=1e-6)
    # Rank over the 3 instance kernels: ln 3 on the 8 thing pixels, 0 on the 8 ignored ones.
    assert losses["s0.rank"].item() == pytest.approx(0.1 * math.log(3) * 8 / 16, rel=1e-6)
    # Dense focal: 12 fg pixels (8 thing + 4 stuff) -> 12 positive and 52 negative elements.
    assert losses["s0.seg"].item() == pytest.approx((12 * 0.0625 + 52 * 0.1875) * LN2 / 12, rel=1e-6)
    # Stage 1: positives = the thing + the present stuff kernel -> avg_factor 2.
    # Weighted elements: 3 thing kernels x 2 thing columns (1 pos), 2 stuff kernels x own column (1 pos).
    assert losses["s1.cls"].item() == pytest.approx(2.0 * (2 * 0.0625 + 6 * 0.1875) * LN2 / 2, rel=1e-6)
    assert losses["s1.mask"].item() == pytest.approx(LN2, rel=1e-6)
    dice_stuff = 1 - 2 * 2 / (4.001 + 4.001)
    assert losses["s1.dice"].item() == pytest.approx(4.0 * (dice_thing + dice_stuff) / 2, rel=1e-6)
    # Rank over all 5 kernels: 12 covered pixels.
    assert losses["s1.rank"].item() == pytest.approx(0.1 * math.log(5) * 12 / 16, rel=1e-6)


def test_more_gts_than_kernels_only_matched_in_dense_target() -> None:
    quads = [region(slice(r, r + 8), slice(c, c + 8)) for r in (0, 8) for c in (0, 8)][:3]
    tgts = [target([(0, q) for q in quads])]
    losses = crit_instance()(make_outputs(1, 2, 2, 1, zeros=True), tgts)
    # Only 2 of the 3 GTs (4 pixels each) are matched -> 8 fg pixels out of 16, 2 classes.
    assert losses["s0.seg"].item() == pytest.approx((8 * 0.0625 + 24 * 0.1875) * LN2 / 8, rel=1e-6)
    # avg_factor = 2 positives; 2 kernels x 2 classes.
    assert losses["s1.cls"].item() == pytest.approx(2.0 * (2 * 0.0625 + 2 * 0.1875) * LN2 / 2, rel=1e-6)


# --------------------------------------------------------------------------- which stage is matched on what


def _mask(m: torch.Tensor) -> torch.Tensor:
    """Confident logits for a 16x16 region, at stride 4."""
    small = m.reshape(H4, 4, H4, 4).any(-1).any(1)
    return torch.where(small, 6.0, -6.0)


def test_each_stage_is_matched_on_previous_stage_predictions() -> None:
    crit = crit_instance()
    tgts = [target([(0, TOP), (1, BOTTOM)])]
    a, b = _mask(TOP), _mask(BOTTOM)
    outs = make_outputs(1, 2, 2, 2)
    m0 = torch.stack([a, b])[None]  # stage 0: kernel 0 -> TOP
    m1 = torch.stack([b, a])[None]  # stage 1 swapped: kernel 0 -> BOTTOM
    m2 = torch.stack([a, b])[None]  # stage 2: kernel 0 -> TOP again
    outs = [o._replace(mask_logits=m) for o, m in zip(outs, (m0, m1, m2))]
    losses = crit(outs, tgts)
    ta = TOP.reshape(H4, 4, H4, 4).any(-1).any(1).float()
    tb = BOTTOM.reshape(H4, 4, H4, 4).any(-1).any(1).float()
    by_m0 = torch.stack([ta, tb])  # assignment of M0 (kernel 0 <-> TOP)
    by_m1 = torch.stack([tb, ta])  # assignment of M1 (kernel 0 <-> BOTTOM)
    # Stage 0 on its own masks; stage 1 on M0 -> its swapped masks are penalised.
    assert losses["s0.mask"].item() == pytest.approx(mask_bce_loss(m0[0], by_m0).item(), rel=1e-5)
    assert losses["s1.mask"].item() == pytest.approx(mask_bce_loss(m1[0], by_m0).item(), rel=1e-5)
    # Stage 2 on stage 1's masks -> its own (correct-looking) masks are penalised.
    assert losses["s2.mask"].item() == pytest.approx(mask_bce_loss(m2[0], by_m1).item(), rel=1e-5)
    assert losses["s1.mask"].item() > 5 and losses["s2.mask"].item() > 5 and losses["s0.mask"].item() < 0.1


class RecordingMatcher(HungarianMatcher):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, mask_logits, cls_logits, gt_masks, gt_labels):  # type: ignore[no-untyped-def]
        self.calls.append((mask_logits, cls_logits))
        return super().forward(mask_logits, cls_logits, gt_masks, gt_labels)


def test_matcher_inputs_per_stage_panoptic() -> None:
    matcher = RecordingMatcher()
    crit = crit_panoptic(matcher=matcher)
    outs = make_outputs(2, 5, 4, 3)
    tgts = [target([(0, TOP), (3, BOTTOM)]), target([(1, BOTTOM)])]
    crit(outs, tgts)
    # Stage 0 and stage 1 share the M0 assignment; stages 2, 3 match on stages 1, 2.
    assert len(matcher.calls) == 3
    m, c = matcher.calls[0]
    assert c is None and not m.requires_grad
    torch.testing.assert_close(m, outs[0].mask_logits[:, :3])
    for call, prev in zip(matcher.calls[1:], outs[1:3]):
        m, c = call
        assert not m.requires_grad and not c.requires_grad
        torch.testing.assert_close(m, prev.mask_logits[:, :3])  # proposals only
        torch.testing.assert_close(c, prev.cls_logits[:, :3, :2])  # thing columns only


def test_stage2_uses_class_cost_of_stage1() -> None:
    # Stage-1 masks are identical for both kernels; its class scores decide stage 2's targets.
    crit = crit_instance()
    tgts = [target([(0, TOP), (1, BOTTOM)])]
    outs = make_outputs(1, 2, 2, 2)
    outs[0] = outs[0]._replace(mask_logits=torch.stack([_mask(TOP), _mask(BOTTOM)])[None])
    flat = torch.zeros(1, 2, H4, H4)
    cls1 = torch.tensor([[[-8.0, 8.0], [8.0, -8.0]]])  # kernel 0 -> class 1 (BOTTOM)
    outs[1] = outs[1]._replace(mask_logits=flat, cls_logits=cls1.clone())
    cls2 = torch.tensor([[[-8.0, 8.0], [8.0, -8.0]]], requires_grad=True)
    outs[2] = outs[2]._replace(cls_logits=cls2)
    losses = crit(outs, tgts)
    # Matched kernel 0 -> class 1 and kernel 1 -> class 0: stage 2's class loss is tiny.
    assert losses["s2.cls"].item() < 1e-4
    # Stage 1 is matched on M0 (kernel 0 -> TOP, class 0): the same scores are now wrong.
    assert losses["s1.cls"].item() > 1.0


# --------------------------------------------------------------------------- stuff handling


def test_class_weights_stuff_one_hot_and_thing_kernels_blind_to_stuff() -> None:
    crit = crit_panoptic()
    outs = make_outputs(2, 5, 4, 2)
    tgts = [target([(0, TOP), (2, BOTTOM_LEFT)]), target([(1, BOTTOM), (3, TOP)])]
    total(crit(outs, tgts)).backward()
    for s in (1, 2):
        g = outs[s].cls_logits.grad
        assert g is not None
        assert torch.all(g[:, :3, 2:] == 0), "thing kernels must get no loss on stuff columns"
        assert torch.all(g[:, :3, :2] != 0)
        # Stuff kernel k (row 3 + k) only in its own column 2 + k.
        eye = torch.eye(2, dtype=torch.bool)
        stuff_grad = g[:, 3:, 2:]
        assert torch.all(stuff_grad[:, eye] != 0) and torch.all(stuff_grad[:, ~eye] == 0)
        assert torch.all(g[:, 3:, :2] == 0)


def test_absent_stuff_is_background_and_present_is_positive() -> None:
    crit = crit_panoptic()
    outs = make_outputs(1, 5, 4, 1)
    tgts = [target([(2, BOTTOM)])]  # stuff k=0 present, k=1 absent
    total(crit(outs, tgts)).backward()
    g = outs[1].cls_logits.grad[0]
    # The focal loss falls monotonically in p for a positive and rises for a negative.
    assert g[3, 2] < 0 and g[4, 3] > 0


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_sizes_and_empty_images(batch: int) -> None:
    crit = crit_panoptic()
    pool = [
        target([(0, TOP), (1, BOTTOM_LEFT), (2, BOTTOM)]),
        target([(3, TOP), (2, BOTTOM)]),  # no thing
        target([(0, TOP), (1, BOTTOM)]),  # no stuff
    ]
    outs = make_outputs(batch, 5, 4, 2)
    losses = crit(outs, pool[:batch])
    assert all(torch.isfinite(v) for v in losses.values())
    total(losses).backward()
    for o in outs:
        assert o.mask_logits.grad is not None and o.mask_logits.grad.abs().sum() > 0
        if o.cls_logits is not None:
            assert o.cls_logits.grad is not None and o.cls_logits.grad.abs().sum() > 0
    assert outs[0].sem_logits.grad is not None and outs[0].sem_logits.grad.abs().sum() > 0


def test_image_without_any_segment() -> None:
    crit = crit_panoptic()
    outs = make_outputs(1, 5, 4, 1)
    losses = crit(outs, [target([])])
    assert losses["s0.mask"].item() == 0 and losses["s1.dice"].item() == 0 and losses["s1.rank"].item() == 0
    assert losses["s1.cls"].item() > 0 and losses["s0.seg"].item() > 0
    total(losses).backward()
    assert outs[1].cls_logits.grad.abs().sum() > 0


def test_an_emptied_thing_stays_a_target_an_emptied_stuff_does_not() -> None:
    crit = crit_panoptic()
    empty = torch.zeros(IMG, IMG, dtype=torch.bool)
    tgt = target([(0, TOP), (1, empty), (3, empty), (2, BOTTOM), (1, empty)], crowd=[False] * 4 + [True])
    gts = crit._prepare_targets([tgt], (H4, H4), torch.device("cpu"))
    assert gts.thing_labels[0].tolist() == [0, 1]  # the empty crowd still goes
    assert not bool(gts.thing_masks[0][1].any())
    assert gts.stuff_present[0].tolist() == [True, False]
    # the empty thing is matched like any other: two positives, finite losses
    outs = make_outputs(1, 5, 4, 1)
    losses = crit(outs, [tgt])
    assert all(torch.isfinite(v) for v in losses.values())
    total(losses).backward()
    assert int((outs[1].cls_logits.grad[0, :3, :2] < 0).sum()) == 2


def test_crowd_and_stuff_in_instance_mode_are_ignored() -> None:
    crit = crit_instance()
    outs = make_outputs(1, 2, 2, 1)
    plain = crit(outs, [target([(0, TOP)])])
    inst_with_stuff = KNetCriterion(num_things=2, num_stuff=1, num_proposals=2, stuff_kernels=False)
    noisy = inst_with_stuff(outs, [target([(0, TOP), (1, BOTTOM), (2, BOTTOM_LEFT)], crowd=[False, True, False])])
    for k in plain:
        assert noisy[k].item() == pytest.approx(plain[k].item(), rel=1e-6)


def test_targets_smaller_than_padded_input() -> None:
    crit = crit_instance()
    small = region(slice(0, 6), slice(0, 9), size=(13, 14))
    losses = crit(make_outputs(1, 2, 2, 1), [target([(0, small)])])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]"):
        crit(make_outputs(1, 2, 2, 1), [target([(0, region(slice(0, 4), slice(0, 4), size=(20, 16)))])])


def test_stage_weights() -> None:
    outs = make_outputs(1, 2, 2, 2)
    tgts = [target([(0, TOP)])]
    base = crit_instance()(outs, tgts)
    weighted = crit_instance(stage_weights=[1.0, 0.5])(outs, tgts)
    assert weighted["s2.dice"].item() == pytest.approx(0.5 * base["s2.dice"].item(), rel=1e-6)
    assert weighted["s1.cls"].item() == pytest.approx(base["s1.cls"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="stage_weights"):
        crit_instance(stage_weights=[1.0])(outs, tgts)


def test_bad_inputs_give_clear_errors() -> None:
    crit = crit_panoptic()
    outs = make_outputs(1, 5, 4, 1)
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]"):
        crit(outs, [target([(7, TOP)])])
    with pytest.raises(ValueError, match=r"outputs\[1\]\.mask_logits"):
        crit([outs[0], outs[1]._replace(mask_logits=torch.zeros(1, 3, H4, H4))], [target([(0, TOP)])])
    with pytest.raises(ValueError, match=r"outputs\[0\]\.sem_logits"):
        crit([outs[0]._replace(sem_logits=None), outs[1]], [target([(0, TOP)])])
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        crit(outs, [target([]), target([])])
    with pytest.raises(ValueError, match="num_stuff must be >= 1 with stuff kernels"):
        KNetCriterion(2, 0, 3)


# --------------------------------------------------------------------------- semantic


def _sem_outputs(batch: int, classes: int, stages: int, size: int = 4, zeros: bool = False) -> list[StageOutput]:
    gen = torch.zeros if zeros else torch.randn
    outs = [
        StageOutput(
            gen(batch, classes, size, size, requires_grad=True),
            None,
            gen(batch, classes, 8),
            gen(batch, classes, 2, 2, requires_grad=True),
        )
    ]
    for _ in range(stages):
        outs.append(StageOutput(gen(batch, classes, size, size, requires_grad=True), None, gen(batch, classes, 8)))
    return outs


def test_semantic_keys_and_hand_values() -> None:
    crit = SemanticCriterion(num_classes=3)
    seg = torch.zeros(32, 32, dtype=torch.long)
    seg[:, 16:] = 255
    outs = _sem_outputs(1, 3, 2, zeros=True)
    losses = crit(outs, [{"sem_seg": seg}])
    assert set(losses) == {"s0.ce", "s1.ce", "s2.ce", "aux.ce"}
    # Uniform logits: ln 3 per valid pixel; mmseg 0.x mean counts the void half too.
    for k in ("s0.ce", "s1.ce", "s2.ce"):
        assert losses[k].item() == pytest.approx(math.log(3) / 2, rel=1e-6)
    assert losses["aux.ce"].item() == pytest.approx(0.4 * math.log(3) / 2, rel=1e-6)
    valid_only = SemanticCriterion(num_classes=3, avg_non_ignore=True)(outs, [{"sem_seg": seg}])
    assert valid_only["s1.ce"].item() == pytest.approx(math.log(3), rel=1e-6)


def test_semantic_padding_resize_and_gradients() -> None:
    crit = SemanticCriterion(num_classes=3, stage_weights=[0.5])
    segs = [{"sem_seg": torch.randint(0, 3, (20, 30))}, {"sem_seg": torch.randint(0, 3, (32, 17))}]
    outs = _sem_outputs(2, 3, 1, size=8)
    losses = crit(outs, segs)
    # Pad to /32 -> labels 32x32; a wrong pad_size is caught.
    assert all(torch.isfinite(v) for v in losses.values())
    total(losses).backward()
    assert all(o.mask_logits.grad.abs().sum() > 0 for o in outs)
    assert outs[0].sem_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pad_size"):
        crit(outs, segs, pad_size=(16, 16))
    # Stage weight applies to the update stage only.
    unweighted = SemanticCriterion(num_classes=3)(outs, segs)
    assert losses["s1.ce"].item() == pytest.approx(0.5 * unweighted["s1.ce"].item(), rel=1e-6)
    assert losses["s0.ce"].item() == pytest.approx(unweighted["s0.ce"].item(), rel=1e-6)


def test_semantic_bad_labels() -> None:
    crit = SemanticCriterion(num_classes=3)
    with pytest.raises(ValueError, match=r"targets\[0\]\['sem_seg'\]"):
        crit(_sem_outputs(1, 3, 1), [{"sem_seg": torch.full((8, 8), 5)}])
    with pytest.raises(ValueError, match=r"outputs\[1\]\.mask_logits"):
        bad = _sem_outputs(1, 3, 1)
        bad[1] = bad[1]._replace(mask_logits=torch.zeros(1, 4, 4, 4))
        crit(bad, [{"sem_seg": torch.zeros(8, 8, dtype=torch.long)}])


def test_accepts_tv_tensors_masks() -> None:
    from torchvision import tv_tensors

    tgt = target([(0, TOP), (2, BOTTOM)])
    wrapped = {**tgt, "masks": tv_tensors.Mask(tgt["masks"])}
    outs = make_outputs(1, 5, 4, 1)
    plain = crit_panoptic()(outs, [tgt])
    got = crit_panoptic()(outs, [wrapped])
    assert all(type(v) is torch.Tensor for v in got.values())
    for k in plain:
        assert got[k].item() == pytest.approx(plain[k].item(), rel=1e-6)
    sem = SemanticCriterion(num_classes=3)(
        _sem_outputs(1, 3, 1), [{"sem_seg": tv_tensors.Mask(torch.zeros(8, 8, dtype=torch.long))}]
    )
    assert all(type(v) is torch.Tensor for v in sem.values())


def test_last_cover_reads_only_selected_masks_and_later_ones_win() -> None:
    from knet_lightning.criterion.targets import last_cover

    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 9, 5, 6, generator=gen) > 0.6).float() * torch.rand(3, 9, 5, 6, generator=gen)
    rows = torch.rand(3, 9, generator=gen) > 0.5
    rows[2] = False  # an image without positives
    k = torch.arange(9).view(1, 9, 1, 1)
    naive = torch.where((masks > 0) & rows[:, :, None, None], k, -1).amax(1)
    assert torch.equal(last_cover(masks, rows), naive)
    assert (last_cover(masks, rows)[2] == -1).all()
