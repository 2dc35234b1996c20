"""Post-processing on crafted logits: panoptic merge, instance top-k, semantic argmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from knet_lightning.postprocess.merge import (
    instance_inference,
    panoptic_inference,
    panoptic_to_semantic,
    semantic_inference,
)
from knet_lightning.postprocess.sparse_merge import _axis_taps
from knet_lightning.postprocess.sparse_merge import merge_sparse as _merge_sparse

ON, OFF = 12.0, -12.0  # saturated mask logits: sigmoid ~ 1 - 6e-6 / 6e-6


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def _box(rows: slice, cols: slice, size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    m = torch.full(size, OFF)
    m[rows, cols] = ON
    return m


def _panoptic_case(small_thing_score: float) -> tuple[torch.Tensor, torch.Tensor]:
    """5 kernels on an 8x8 grid: 3 thing proposals (classes 0, 1) and 2 stuff kernels
    (kernel 3 -> class 2, kernel 4 -> class 3)."""
    masks = torch.stack(
        [
            _box(slice(0, 4), slice(0, 4)),  # k0 thing, class 1, score 0.9
            _box(slice(0, 4), slice(1, 5)),  # k1 thing, class 0, 0.8: mostly under k0
            _box(slice(6, 8), slice(0, 2)),  # k2 thing, class 0, score under test
            _box(slice(4, 8), slice(0, 8)),  # k3 stuff class 2, score 0.01
            _box(slice(0, 4), slice(5, 8)),  # k4 stuff class 3, score 0.5
        ]
    )
    cls = torch.full((5, 4), 8.0)  # high everywhere: only the right columns may be read
    for k, (label, score) in enumerate([(1, 0.9), (0, 0.8), (0, small_thing_score)]):
        cls[k, :2] = logit(score) - 3.0
        cls[k, label] = logit(score)
    cls[3, 2] = logit(0.01)
    cls[4, 3] = logit(0.5)
    return masks, cls


def test_panoptic_merge_overlap_threshold_and_void():
    masks, cls = _panoptic_case(small_thing_score=0.29)
    pan, segs = panoptic_inference(
        masks, cls, num_things=2, num_proposals=3, image_size=(8, 8), padded_size=(8, 8), output_size=(8, 8)
    )
    assert pan.dtype == torch.int32 and pan.shape == (8, 8)
    expected = torch.zeros(8, 8, dtype=torch.int32)
    expected[0:4, 0:4] = 1  # k0
    expected[0:4, 5:8] = 2  # k4 (stuff, 0.5)
    expected[4:8, :] = 3  # k3 (stuff, score 0.01 is still kept)
    expected[6:8, 0:2] = 0  # owned by k2 (0.29 < 0.3) -> void
    # Column 4 rows 0-3 is owned by k1, which keeps 4/16 < 0.6 of its mask -> void.
    torch.testing.assert_close(pan, expected)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segs] == [(1, 1, True), (2, 3, False), (3, 2, False)]
    assert [s["score"] for s in segs] == pytest.approx([0.9, 0.5, 0.01])


def test_panoptic_thing_threshold_keeps_0_31():
    masks, cls = _panoptic_case(small_thing_score=0.31)
    pan, segs = panoptic_inference(masks, cls, 2, 3, (8, 8), (8, 8), (8, 8))
    # Ids follow descending score: k0 0.9, k4 0.5, k2 0.31, k3 0.01.
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segs] == [
        (1, 1, True),
        (2, 3, False),
        (3, 0, True),
        (4, 2, False),
    ]
    assert (pan[6:8, 0:2] == 3).all()
    assert int((pan == 4).sum()) == 28
    assert int((pan == 0).sum()) == 4  # only k1's leftover column


def test_panoptic_crop_and_resize_to_output_size():
    masks, cls = _panoptic_case(small_thing_score=0.31)
    # The stride-4 grid covers a 32x32 padded input; the image is the top 16 rows, so the
    # stuff kernel k3 and thing k2 (grid rows 4-7) lie in the padding and must vanish.
    pan, segs = panoptic_inference(masks, cls, 2, 3, image_size=(16, 32), padded_size=(32, 32), output_size=(8, 16))
    assert pan.shape == (8, 16)
    assert [(s["id"], s["category_id"]) for s in segs] == [(1, 1), (2, 3)]
    # Output pixel (y, x) covers grid cell (y // 2, x // 2); check cell interiors.
    assert (pan[:, 0:6] == 1).all()  # grid cols 0-2: k0
    assert (pan[:, 11:16] == 2).all()  # grid cols 6-7 (and most of 5): k4
    assert (pan[:, 8:10] == 0).all()  # grid col 4: dropped k1 -> void
    # Same result as the official rescale chain done by hand.
    probs = F.interpolate(masks[None].sigmoid(), size=(32, 32), mode="bilinear", align_corners=False)
    probs = F.interpolate(probs[:, :, :16, :32], size=(8, 16), mode="bilinear", align_corners=False)[0]
    scores = torch.tensor([0.9, 0.8, 0.31, 0.01, 0.5])
    owner = (scores[:, None, None] * probs).argmax(0)
    torch.testing.assert_close(pan == 1, owner == 0)
    torch.testing.assert_close(pan == 2, owner == 4)


def test_panoptic_without_stuff_kernels_official_argmax_ownership():
    masks, cls = _panoptic_case(small_thing_score=0.31)
    pan, segs = panoptic_inference(
        masks[:3], cls[:3, :2], num_things=2, num_proposals=3, image_size=(8, 8), padded_size=(8, 8), output_size=(8, 8)
    )
    # Every pixel has an argmax owner: where no mask is on, the highest score (k0) wins, so
    # k0 keeps more than its own mask and stays; k2 keeps its 4 px.
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segs] == [(1, 1, True), (2, 0, True)]
    assert (pan[4:6] == 1).all() and (pan[6:8, 0:2] == 2).all() and (pan[0:4, 4] == 0).all()


def test_panoptic_bad_inputs():
    masks, cls = _panoptic_case(0.5)
    with pytest.raises(ValueError, match="cls_logits"):
        panoptic_inference(masks, cls[:4], 2, 3, (8, 8), (8, 8), (8, 8))
    with pytest.raises(ValueError, match="image_size"):
        panoptic_inference(masks, cls, 2, 3, (16, 8), (8, 8), (8, 8))
    with pytest.raises(ValueError, match="num_things"):
        panoptic_inference(masks, cls, 3, 3, (8, 8), (8, 8), (8, 8))  # 3 + 2 stuff > 4 columns
    with pytest.raises(ValueError, match="mask_logits"):
        panoptic_inference(masks[0], cls, 2, 3, (8, 8), (8, 8), (8, 8))


def test_instance_topk_order_labels_and_masks():
    probs = torch.tensor(
        [
            [0.9, 0.1, 0.7, 0.05],
            [0.2, 0.8, 0.1, 0.1],
            [0.3, 0.05, 0.05, 0.6],
        ]
    )
    cls = torch.log(probs / (1 - probs))
    masks = torch.stack(
        [_box(slice(0, 4), slice(0, 4)), _box(slice(4, 8), slice(0, 8)), _box(slice(0, 4), slice(4, 8))]
    )
    out = instance_inference(masks, cls, image_size=(32, 32), padded_size=(32, 32), output_size=(16, 16), max_per_img=4)
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.8, 0.7, 0.6]))
    assert out["labels"].dtype == torch.int64
    assert out["labels"].tolist() == [0, 1, 2, 3]
    m = out["masks"]
    assert m.dtype == torch.bool and m.shape == (4, 16, 16)
    # Kernel 0 appears twice (classes 0 and 2) with the same mask.
    assert torch.equal(m[0], m[2])
    expected = [torch.zeros(16, 16, dtype=torch.bool) for _ in range(3)]
    expected[0][:8, :8] = True
    expected[1][8:, :] = True
    expected[2][:8, 8:] = True
    for got, kernel in zip(m, [0, 1, 0, 2]):
        torch.testing.assert_close(got, expected[kernel])
    all_pairs = instance_inference(masks, cls, (32, 32), (32, 32), (16, 16), max_per_img=100)
    assert all_pairs["scores"].shape == (12,)
    assert torch.all(all_pairs["scores"][:-1] >= all_pairs["scores"][1:])


def test_semantic_argmax_with_crop_and_resize():
    logits = torch.zeros(3, 4, 4)
    logits[0, 0:2, 0:2] = 5.0  # class 0: top-left
    logits[1, 0:2, 2:4] = 5.0  # class 1: top-right
    logits[2, 2:4, :] = 5.0  # class 2: bottom half, which is padding
    sem = semantic_inference(logits, image_size=(8, 16), padded_size=(16, 16), output_size=(10, 20))
    assert sem.dtype == torch.int64 and sem.shape == (10, 20)
    expected = torch.zeros(10, 20, dtype=torch.int64)
    expected[:, 10:] = 1
    torch.testing.assert_close(sem, expected)
    # Without the crop the padding class shows up.
    uncropped = semantic_inference(logits, image_size=(16, 16), padded_size=(16, 16), output_size=(16, 16))
    assert (uncropped[12:] == 2).all()


def test_panoptic_to_semantic_maps_ids_and_void():
    pan = torch.tensor([[0, 1, 1], [2, 2, 7]], dtype=torch.int32)
    sem = panoptic_to_semantic(pan, [{"id": 1, "category_id": 4}, {"id": 2, "category_id": 0}])
    assert sem.dtype == torch.int64
    assert sem.tolist() == [[255, 4, 4], [0, 0, 255]]
    assert panoptic_to_semantic(pan, [], ignore_index=9).tolist() == [[9, 9, 9], [9, 9, 9]]


def test_runs_under_inference_mode_and_half_precision():
    masks, cls = _panoptic_case(0.31)
    with torch.inference_mode():
        pan, segs = panoptic_inference(masks.half(), cls.half(), 2, 3, (8, 8), (8, 8), (8, 8))
    assert len(segs) == 4 and pan.shape == (8, 8)


CHAINS = [
    ((64, 80), (64, 96), (64, 80)),  # crop only
    ((50, 70), (64, 96), (123, 171)),  # crop, then upsample to a larger original
    ((64, 80), (64, 96), (20, 25)),  # crop, then downsample
    ((64, 96), (64, 96), (64, 96)),  # x4 only, the common evaluation case
    ((61, 93), (64, 96), (480, 640)),  # large non-integer upsampling
    ((16, 24), (16, 24), (16, 24)),  # no resize at all
]


def _random_outputs(gen: torch.Generator, trial: int, num_kernels: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(24), indexing="ij")
    if trial % 2:  # noise: many kernels can win somewhere
        mask_logits = torch.randn(num_kernels, 16, 24, generator=gen) * 3
    else:  # confident blobs with a few high scores, like a trained model
        mask_logits = torch.full((num_kernels, 16, 24), -6.0)
        for n in range(num_kernels):
            cy, cx = int(torch.randint(0, 16, (1,), generator=gen)), int(torch.randint(0, 24, (1,), generator=gen))
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < int(torch.randint(2, 8, (1,), generator=gen)) ** 2
            mask_logits[n] = -6 + 12 * blob.float() + torch.randn(16, 24, generator=gen)
    return mask_logits, torch.randn(num_kernels, 12, generator=gen) * 3


def _official_resize(
    maps: torch.Tensor, image_size: tuple[int, int], padded_size: tuple[int, int], output_size: tuple[int, int]
) -> torch.Tensor:
    """``(C, h, w)`` -> ``(C, H, W)`` by the official ``rescale_masks`` chain, in one call on all maps:
    bilinear to the padded size, crop to the image, bilinear to the output size."""
    resized = F.interpolate(maps[None], size=padded_size, mode="bilinear", align_corners=False)
    resized = resized[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(resized, size=output_size, mode="bilinear", align_corners=False)[0]


def _official_scores(
    mask_logits: torch.Tensor,
    cls_logits: torch.Tensor,
    num_things: int,
    num_proposals: int,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
) -> torch.Tensor:
    """score * prob of every kernel at every output pixel, by the official rescale chain."""
    probs = _official_resize(mask_logits.sigmoid(), image_size, padded_size, output_size)
    cls = cls_logits.sigmoid()
    num_stuff = cls.shape[0] - num_proposals
    scores = torch.cat(
        [
            cls[:num_proposals, :num_things].max(1).values,
            cls[num_proposals:, num_things : num_things + num_stuff].diagonal(),
        ]
    )
    return scores[:, None, None] * probs


@pytest.mark.parametrize("image_size,padded_size,output_size", CHAINS)
def test_pruning_and_sparse_merge_equal_the_full_official_merge(
    image_size: tuple[int, int], padded_size: tuple[int, int], output_size: tuple[int, int]
) -> None:
    gen = torch.Generator().manual_seed(0)
    kept = 0
    for trial in range(6):
        mask_logits, cls_logits = _random_outputs(gen, trial)
        args = (mask_logits, cls_logits, 7, 25, image_size, padded_size, output_size)
        full = panoptic_inference(*args, method="dense", prune=False)
        pruned = panoptic_inference(*args, method="dense", prune=True)
        sparse = panoptic_inference(*args, method="sparse")
        assert torch.equal(full[0], pruned[0]) and full[1] == pruned[1]
        assert full[1] == sparse[1]
        # The sparse merge resizes with composed taps: equal up to float rounding, so a pixel
        # may only differ where two kernels tie to within rounding.
        differ = full[0] != sparse[0]
        assert differ.sum() <= 2
        if differ.any():
            top2 = _official_scores(mask_logits, cls_logits, 7, 25, image_size, padded_size, output_size).topk(2, 0)
            gap = (top2.values[0] - top2.values[1]) / top2.values[0]
            assert (gap[differ] < 1e-6).all()
        kept += len(full[1])
    assert kept >= 6  # the cases keep segments, so the ids and areas are compared too


@pytest.mark.parametrize("image_size,padded_size,output_size", CHAINS)
def test_sparse_merge_owner_and_areas_against_brute_force(
    image_size: tuple[int, int], padded_size: tuple[int, int], output_size: tuple[int, int]
) -> None:
    """The bounds may only skip work: every owner and every area of a kernel that owns a
    pixel equals an evaluation of all kernels at all pixels with the composed taps."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        mask_logits, cls_logits = _random_outputs(gen, trial, num_kernels=12)
        probs = mask_logits.sigmoid()
        scores = cls_logits[:, 0].sigmoid()
        owner, area = _merge_sparse(probs, scores, image_size, padded_size, output_size, mask_thr=0.5)
        ystart, wy = _axis_taps(output_size[0], image_size[0], padded_size[0], 16)
        xstart, wx = _axis_taps(output_size[1], image_size[1], padded_size[1], 24)
        rows = ystart[:, None] + torch.arange(wy.shape[1])  # (H, Ky)
        cols = xstart[:, None] + torch.arange(wx.shape[1])  # (W, Kx)
        cells = probs[:, rows[:, :, None, None], cols[None, None, :, :]]  # (N, H, Ky, W, Kx)
        full = torch.einsum("ha,wc,nhawc->nhw", wy.double(), wx.double(), cells.double())
        cur = scores[:, None, None].double() * full
        margin = cur.max(0).values - cur.topk(2, dim=0).values[1]
        clear = margin > 1e-6  # away from float ties, the argmax is unambiguous
        assert torch.equal(owner[clear], cur.argmax(0)[clear])
        owners = owner.unique()
        expected = (full >= 0.5).flatten(1).sum(1)
        near = ((full - 0.5).abs() < 1e-6).flatten(1).sum(1)
        assert ((area[owners] - expected[owners]).abs() <= near[owners]).all()


def test_composed_taps_equal_the_official_resize_chain() -> None:
    x = torch.rand(3, 16, 24, dtype=torch.float64)
    for image_size, padded_size, output_size in CHAINS:
        chain = _official_resize(x, image_size, padded_size, output_size)
        ystart, wy = _axis_taps(output_size[0], image_size[0], padded_size[0], 16)
        xstart, wx = _axis_taps(output_size[1], image_size[1], padded_size[1], 24)
        assert wy.shape[1] <= 3 and wx.shape[1] <= 3
        torch.testing.assert_close(wy.sum(1), torch.ones(output_size[0]))
        rows = ystart[:, None] + torch.arange(wy.shape[1])
        cols = xstart[:, None] + torch.arange(wx.shape[1])
        composed = torch.einsum("ha,wc,nhawc->nhw", wy.double(), wx.double(), x[:, rows[:, :, None, None], cols])
        torch.testing.assert_close(composed, chain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_ties_go_to_the_first_kernel(method: str) -> None:
    # Four identical kernels with equal scores: every pixel is a four-way tie.
    mask_logits = torch.full((4, 8, 8), 20.0)  # sigmoid saturates to exactly 1.0
    cls_logits = torch.zeros(4, 3)
    pan, segs = panoptic_inference(mask_logits, cls_logits, 1, 2, (32, 32), (32, 32), (32, 32), method=method)
    assert (pan == 1).all()
    assert [(s["category_id"], s["isthing"]) for s in segs] == [(0, True)]  # kernel 0
    # A single kernel owns everything.
    pan, segs = panoptic_inference(
        mask_logits[:1], cls_logits[:1, :1], 1, 1, (32, 32), (32, 32), (16, 16), method=method
    )
    assert (pan == 1).all() and len(segs) == 1


def test_sparse_merge_at_network_resolution_matches_on_model_like_outputs() -> None:
    """A 153-kernel, 512x512 case like the benchmark's: both methods agree."""
    gen = torch.Generator().manual_seed(3)
    mask_logits = torch.randn(153, 128, 128, generator=gen) * 5 - 8
    cls_logits = torch.randn(153, 133, generator=gen) * 2 - 1
    args = (mask_logits, cls_logits, 80, 100, (500, 512), (512, 512), (375, 384))
    dense = panoptic_inference(*args, method="dense")
    sparse = panoptic_inference(*args, method="sparse")
    assert torch.equal(dense[0], sparse[0]) and dense[1] == sparse[1]


def test_unknown_merge_method() -> None:
    masks, cls = _panoptic_case(0.5)
    with pytest.raises(ValueError, match="method"):
        panoptic_inference(masks, cls, 2, 3, (8, 8), (8, 8), (8, 8), method="fast")


def test_auto_method_picks_sparse_for_smooth_outputs_and_dense_for_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    import knet_lightning.postprocess.merge as pp

    calls: list[str] = []
    dense, sparse = pp._merge_dense, pp.merge_sparse

    def spy_dense(*args, **kwargs):
        calls.append("dense")
        return dense(*args, **kwargs)

    def spy_sparse(*args, **kwargs):
        out = sparse(*args, **kwargs)
        calls.append("sparse" if isinstance(out, tuple) else "sparse-gave-up")
        return out

    monkeypatch.setattr(pp, "_merge_dense", spy_dense)
    monkeypatch.setattr(pp, "merge_sparse", spy_sparse)
    gen = torch.Generator().manual_seed(4)
    cls_logits = torch.randn(40, 12, generator=gen) * 3
    size = ((256, 256), (256, 256), (256, 256))
    # confident discs with soft edges, like a trained model's masks
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centers, radii = torch.rand(40, 2, generator=gen) * 64, 4 + torch.rand(40, generator=gen) * 12
    dist = ((yy - centers[:, 0, None, None]) ** 2 + (xx - centers[:, 1, None, None]) ** 2).sqrt()
    smooth = ((radii[:, None, None] - dist) * 2).clamp(-8, 8)
    for k in range(5):  # the 5 stuff kernels: horizontal bands that cover the background
        smooth[35 + k] = (((yy - 6.4 - 12.8 * k).abs() - 6.4) * -2).clamp(-8, 8)
    smooth += torch.randn(40, 64, 64, generator=gen) * 0.5
    pan, segs = panoptic_inference(smooth, cls_logits, 7, 35, *size)
    assert calls == ["sparse"]
    ref = panoptic_inference(smooth, cls_logits, 7, 35, *size, method="dense")
    assert segs == ref[1] and (pan != ref[0]).sum() <= 2
    calls.clear()
    noise = torch.randn(40, 64, 64, generator=gen) * 5
    pan, segs = panoptic_inference(noise, cls_logits, 7, 35, *size)
    assert calls == ["sparse-gave-up", "dense"]
    ref = panoptic_inference(noise, cls_logits, 7, 35, *size, method="dense")
    assert torch.equal(pan, ref[0]) and segs == ref[1]
    calls.clear()
    panoptic_inference(smooth[:, :16, :16], cls_logits, 7, 35, (64, 64), (64, 64), (64, 64))  # 40 x 64 x 64: small
    assert calls == ["dense"]


@pytest.mark.parametrize("image_size,padded_size,output_size", CHAINS)
def test_both_dense_folds_equal_the_official_argmax_and_areas(
    image_size: tuple[int, int], padded_size: tuple[int, int], output_size: tuple[int, int]
) -> None:
    """The dense merge folding one map at a time (the CPU's) and chunk-wide (the GPU's) both give
    torch.argmax of the official ``score * prob`` maps (the first kernel on ties) and the
    official ``prob >= 0.5`` areas, over all kernels and over a subset of candidates."""
    import knet_lightning.postprocess.merge as pp

    gen = torch.Generator().manual_seed(4)
    for trial in range(4):
        mask_logits, cls_logits = _random_outputs(gen, trial, num_kernels=20)
        if trial == 2:  # kernels 10-19 copy 0-9: exact ties wherever they lead
            mask_logits[10:], cls_logits[10:] = mask_logits[:10], cls_logits[:10]
        if trial == 3:  # every prob exactly 0.5, every score equal: all ties, every area on the threshold
            mask_logits.zero_()
            cls_logits.zero_()
        scores = cls_logits.sigmoid().max(1).values
        for candidates in (torch.arange(20), torch.tensor([1, 4, 5, 11, 14, 15])):
            # the official chain on the maps the merge rescales (a downsampling resize rounds a
            # channel by its place in the call's vector lanes, so a subset is its own call)
            probs = _official_resize(mask_logits[candidates].sigmoid(), image_size, padded_size, output_size)
            cur = scores[candidates, None, None] * probs
            for by_map in (True, False):
                args = (mask_logits, scores, image_size, padded_size, output_size, 0.5, False)
                owner, area = pp._merge_dense(*args, candidates=candidates, by_map=by_map)
                assert torch.equal(owner, candidates[cur.argmax(0)]), by_map
                assert torch.equal(area[candidates], (probs >= 0.5).flatten(1).sum(1))


@pytest.mark.parametrize("image_size,padded_size,output_size", CHAINS)
def test_rescaling_in_chunks_of_8_equals_one_call(
    image_size: tuple[int, int], padded_size: tuple[int, int], output_size: tuple[int, int]
) -> None:
    """The dense merge's chunks (8 on the CPU, 32 on GPUs) keep every channel's value bit for bit
    that of one call on all maps, which the official code makes."""
    from knet_lightning.postprocess.rescale import rescale_maps, rescale_probs_chunks

    logits = torch.randn(45, 16, 24, generator=torch.Generator().manual_seed(6))
    whole = rescale_maps(logits.sigmoid(), image_size, padded_size, output_size)
    for chunk in (8, 32):
        chunks = rescale_probs_chunks(logits, image_size, padded_size, output_size, chunk)
        assert torch.equal(torch.cat([probs for _, probs in chunks]), whole)


@pytest.mark.parametrize("image_size,padded_size,output_size", CHAINS)
def test_semantic_argmax_folds_equal_torch_argmax_with_ties(
    image_size: tuple[int, int], padded_size: tuple[int, int], output_size: tuple[int, int]
) -> None:
    """The CPU's map-by-map fold (what semantic_inference runs here) and the GPU's chunk-wide fold
    both equal torch.argmax of the official rescale chain, the first class winning ties."""
    import knet_lightning.postprocess.merge as pp

    gen = torch.Generator().manual_seed(5)
    seg_logits = torch.randn(40, 16, 24, generator=gen)
    seg_logits[20:] = seg_logits[:20]  # classes 20-39 copy 0-19: exact ties everywhere
    seg_logits[5, :4] = 1e4  # one class leads a band by far
    expected = _official_resize(seg_logits, image_size, padded_size, output_size).argmax(0)
    assert (expected < 20).all()  # the ties went to the first copies
    assert torch.equal(semantic_inference(seg_logits, image_size, padded_size, output_size), expected)
    for by_map in (True, False):
        best, arg = torch.full(output_size, float("-inf")), torch.zeros(output_size, dtype=torch.long)
        for start in range(0, 40, 8):
            chunk = pp.rescale_maps(seg_logits[start : start + 8], image_size, padded_size, output_size)
            pp._fold_argmax(chunk, start, best, arg, by_map)
        assert torch.equal(arg, expected), by_map
