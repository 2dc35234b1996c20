"""Hungarian matcher: cost values by hand, optimality against brute force, edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from knet_lightning.criterion.matcher import HungarianMatcher


def _naive_cost(
    logits: torch.Tensor, cls: torch.Tensor | None, gts: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Reference cost of one image by explicit double loop. logits (N,h,w), gts (G,h,w)."""
    N, G = logits.shape[0], gts.shape[0]
    cost = torch.zeros(N, G, dtype=torch.float64)
    hw = logits[0].numel()
    for n in range(N):
        p = logits[n].double().sigmoid()
        for g in range(G):
            t = gts[g].double()
            dice = 2 * (p * t).sum() / ((p * p).sum() + 1e-3 + (t * t).sum() + 1e-3)
            acc = ((p * t).sum() + ((1 - p) * (1 - t)).sum()) / hw
            c = -4.0 * dice - 1.0 * acc
            if cls is not None:
                q = cls[n, labels[g]].double().sigmoid()
                pos = 0.25 * (1 - q) ** 2 * -torch.log(q + 1e-12)
                neg = 0.75 * q**2 * -torch.log(1 - q + 1e-12)
                c = c + 2.0 * (pos - neg)
            cost[n, g] = c
    return cost


def _brute_force_min(cost: torch.Tensor) -> float:
    N, G = cost.shape
    best = math.inf
    if N >= G:
        for preds in itertools.permutations(range(N), G):
            best = min(best, sum(cost[preds[g], g].item() for g in range(G)))
    else:
        for gts in itertools.permutations(range(G), N):
            best = min(best, sum(cost[n, gts[n]].item() for n in range(N)))
    return best


def test_cost_matrix_hand_computed() -> None:
    matcher = HungarianMatcher()
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5
    gt = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    cls = torch.zeros(1, 1, 3)  # q = 0.5 at every class
    labels = torch.tensor([2])
    dice = -4.0 * (2 * 0.5 / (1.001 + 1.001))
    mask = -(0.5 + 3 * 0.5) / 4  # soft pixel accuracy, linear
    focal = 2.0 * (0.0625 - 0.1875) * math.log(2.0)
    [no_cls] = matcher.cost_matrices(logits, None, [gt], [labels])
    [with_cls] = matcher.cost_matrices(logits, cls, [gt], [labels])
    assert no_cls.shape == (1, 1)
    assert no_cls.item() == pytest.approx(dice + mask, rel=1e-6)
    assert with_cls.item() == pytest.approx(dice + mask + focal, rel=1e-5)


def test_cost_matrix_matches_naive_reference() -> None:
    matcher = HungarianMatcher()
    logits = torch.randn(2, 3, 5, 4) * 3
    cls = torch.randn(2, 3, 6)
    gts = [torch.rand(2, 5, 4), torch.rand(4, 5, 4)]
    labels = [torch.tensor([0, 5]), torch.tensor([1, 1, 3, 2])]
    costs = matcher.cost_matrices(logits, cls, gts, labels)
    for b in range(2):
        ref = _naive_cost(logits[b], cls[b], gts[b], labels[b])
        torch.testing.assert_close(costs[b].double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_preds,num_gts", [(4, 3), (3, 4), (4, 4)])
@pytest.mark.parametrize("use_cls", [False, True])
def test_matching_is_optimal_vs_brute_force(num_preds: int, num_gts: int, use_cls: bool) -> None:
    matcher = HungarianMatcher()
    for trial in range(3):
        g = torch.Generator().manual_seed(100 * trial + num_preds)
        logits = torch.randn(1, num_preds, 6, 6, generator=g) * 2
        cls = torch.randn(1, num_preds, 5, generator=g) * 2 if use_cls else None
        gt = (torch.rand(num_gts, 6, 6, generator=g) > 0.5).float()
        labels = torch.randint(0, 5, (num_gts,), generator=g)
        [(pred_idx, gt_idx)] = matcher(logits, cls, [gt], [labels])
        assert pred_idx.dtype == torch.long and gt_idx.dtype == torch.long
        assert len(pred_idx) == len(gt_idx) == min(num_preds, num_gts)
        assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(gt_idx.tolist())) == len(gt_idx)
        assert torch.all(pred_idx[1:] > pred_idx[:-1])
        cost = _naive_cost(logits[0], None if cls is None else cls[0], gt, labels)
        total = cost[pred_idx, gt_idx].sum().item()
        assert total == pytest.approx(_brute_force_min(cost), abs=1e-5)


def test_class_cost_changes_assignment() -> None:
    # Both kernels predict the same mask: only the class scores can tell them apart.
    matcher = HungarianMatcher()
    logits = torch.zeros(1, 2, 4, 4)
    gt = torch.zeros(2, 4, 4)
    gt[0, :2] = 1
    gt[1, 2:] = 1
    labels = torch.tensor([0, 1])
    cls = torch.tensor([[[-6.0, 6.0], [6.0, -6.0]]])  # kernel 0 says class 1, kernel 1 says class 0
    [(pred_idx, gt_idx)] = matcher(logits, cls, [gt], [labels])
    assert dict(zip(pred_idx.tolist(), gt_idx.tolist())) == {0: 1, 1: 0}


def test_perfect_masks_are_matched_to_their_gt() -> None:
    matcher = HungarianMatcher()
    gt = torch.zeros(3, 8, 8)
    gt[0, :4, :4] = 1
    gt[1, 4:, :] = 1
    gt[2, :4, 4:] = 1
    perm = torch.tensor([2, 0, 1, 3])  # kernel k predicts gt perm[k]; kernel 3 predicts nothing
    logits = torch.full((1, 4, 8, 8), -8.0)
    logits[0, :3] = torch.where(gt[perm[:3]] > 0, 8.0, -8.0)
    [(pred_idx, gt_idx)] = matcher(logits, None, [gt], [torch.zeros(3, dtype=torch.long)])
    assert pred_idx.tolist() == [0, 1, 2]
    assert gt_idx.tolist() == perm[:3].tolist()


def test_no_gt_and_mixed_batch() -> None:
    matcher = HungarianMatcher()
    logits = torch.randn(3, 4, 4, 4)
    gts = [torch.zeros(0, 4, 4), torch.rand(2, 4, 4), torch.zeros(0, 4, 4)]
    labels = [torch.zeros(0, dtype=torch.long), torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long)]
    out = matcher(logits, torch.randn(3, 4, 2), gts, labels)
    assert [len(p) for p, _ in out] == [0, 2, 0]
    assert all(p.dtype == torch.long and g.dtype == torch.long for p, g in out)
    costs = matcher.cost_matrices(logits, None, gts, labels)
    assert [tuple(c.shape) for c in costs] == [(4, 0), (4, 2), (4, 0)]
    all_empty = matcher(logits[:1], None, gts[:1], labels[:1])
    assert len(all_empty[0][0]) == 0


def test_runs_without_grad() -> None:
    matcher = HungarianMatcher()
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    [cost] = matcher.cost_matrices(logits, None, [torch.rand(1, 4, 4)], [torch.tensor([0])])
    assert not cost.requires_grad


def test_bad_inputs_give_clear_errors() -> None:
    matcher = HungarianMatcher()
    logits = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"gt_masks\[0\]"):
        matcher(logits, None, [torch.rand(1, 5, 4)], [torch.tensor([0])])
    with pytest.raises(ValueError, match=r"gt_labels\[0\]"):
        matcher(logits, torch.randn(1, 2, 3), [torch.rand(1, 4, 4)], [torch.tensor([3])])
    with pytest.raises(ValueError, match="batch of 1"):
        matcher(logits, None, [], [])
    with pytest.raises(ValueError, match="NaN"):
        matcher(torch.full((1, 2, 4, 4), float("nan")), None, [torch.rand(1, 4, 4)], [torch.tensor([0])])
