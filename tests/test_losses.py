"""Loss functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from knet_lightning.criterion.losses import (
    dice_loss,
    mask_bce_loss,
    rank_loss,
    semantic_ce_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_dense,
)

LN2 = math.log(2.0)


def test_focal_at_zero_logit() -> None:
    # p = 0.5 -> BCE = ln2, pt = 0.5: positive weight 0.25 * 0.25, negative 0.75 * 0.25.
    logits = torch.zeros(1, 2)
    targets = torch.tensor([[1.0, 0.0]])
    assert sigmoid_focal_loss(logits, targets, avg_factor=1.0).item() == pytest.approx((0.0625 + 0.1875) * LN2)
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx((0.0625 + 0.1875) * LN2 / 2)


def test_focal_nonzero_logit_weights_and_avg_factor() -> None:
    x = math.log(3.0)  # p = 0.75
    logits = torch.tensor([[x, x]])
    targets = torch.tensor([[1.0, 0.0]])
    pos = -math.log(0.75) * 0.25 * 0.25**2  # alpha * (1 - p)^2 * BCE
    neg = -math.log(0.25) * 0.75 * 0.75**2  # (1 - alpha) * p^2 * BCE
    weight = torch.tensor([[2.0, 0.0]])
    got = sigmoid_focal_loss(logits, targets, weight=weight, avg_factor=4.0)
    assert got.item() == pytest.approx(2 * pos / 4)
    assert sigmoid_focal_loss(logits, targets, avg_factor=torch.tensor(1.0)).item() == pytest.approx(pos + neg)


def test_focal_shape_mismatch_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_dice_hand_value_and_squared_denominator() -> None:
    logits = torch.zeros(1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # a = 0.5, sum p^2 = 1, sum t^2 = 1, each + 1e-3.
    expected = 1 - 2 * 0.5 / (1.001 + 1.001)
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # Perfect prediction: dice ~ 1 -> loss ~ 0.
    perfect = torch.tensor([[[20.0, -20.0], [-20.0, -20.0]]])
    assert dice_loss(perfect, target).item() == pytest.approx(1 - 2 / 2.002, abs=1e-6)


def test_dice_mean_over_masks_and_empty() -> None:
    logits = torch.zeros(2, 2, 2)
    target = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)])
    l0 = 1 - 2 * 2.0 / (1.001 + 4.001)
    l1 = 1 - 0.0
    assert dice_loss(logits, target).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    empty = torch.zeros(0, 2, 2, requires_grad=True)
    out = dice_loss(empty, torch.zeros(0, 2, 2))
    assert out.item() == 0.0 and out.requires_grad


def test_mask_bce_hand_value() -> None:
    logits = torch.tensor([[[2.0, -1.0]]])
    target = torch.tensor([[[1.0, 0.5]]])
    # softplus(x) - x * t
    e0 = math.log1p(math.exp(-2.0))
    e1 = math.log1p(math.exp(-1.0)) + 0.5
    assert mask_bce_loss(logits, target).item() == pytest.approx((e0 + e1) / 2, rel=1e-6)


def test_rank_loss_mean_includes_ignored_pixels() -> None:
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = math.log(3.0)  # pixel 0: softmax = [1/4, 3/4]
    target = torch.tensor([[[1, 255]]])
    assert rank_loss(logits, target).item() == pytest.approx(-math.log(0.75) / 2, rel=1e-6)
    all_ignored = torch.full((1, 1, 2), 255)
    assert rank_loss(logits, all_ignored).item() == 0.0


def test_rank_loss_shape_error() -> None:
    with pytest.raises(ValueError, match="rank_loss"):
        rank_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.long))


def test_semantic_ce_hand_value_both_reductions() -> None:
    logits = torch.zeros(1, 4, 1, 3)  # uniform over 4 classes: CE = ln 4
    target = torch.tensor([[[0, 3, 255]]])
    assert semantic_ce_loss(logits, target).item() == pytest.approx(2 * math.log(4) / 3, rel=1e-6)
    assert semantic_ce_loss(logits, target, avg_non_ignore=True).item() == pytest.approx(math.log(4), rel=1e-6)
    assert semantic_ce_loss(logits, torch.full((1, 1, 3), 255), avg_non_ignore=True).item() == 0.0


def test_losses_backpropagate() -> None:
    logits = torch.randn(3, 4, 4, requires_grad=True)
    target = torch.rand(3, 4, 4)
    (dice_loss(logits, target) + mask_bce_loss(logits, target)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("avg_factor", [None, 7.0])
def test_dense_focal_loss_equals_the_one_hot_focal_loss_with_gradients(avg_factor: float | None) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 6, 7, generator=gen) * 4).requires_grad_()
    target = torch.randint(0, 6, (2, 6, 7), generator=gen)  # 5 = background
    target[0, 0, :3] = -1  # another background id
    onehot = torch.nn.functional.one_hot(target.clamp(min=0), 6)[..., :5].permute(0, 3, 1, 2)
    onehot[0, :, 0, :3] = 0
    ref = sigmoid_focal_loss(logits, onehot, avg_factor=avg_factor)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    got = sigmoid_focal_loss_dense(logits, target, avg_factor=avg_factor)
    (got_grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_grad, ref_grad)
    # all background: only negative terms
    bg = torch.full((2, 6, 7), 5)
    torch.testing.assert_close(
        sigmoid_focal_loss_dense(logits, bg, avg_factor=1.0),
        sigmoid_focal_loss(logits, torch.zeros_like(logits), avg_factor=1.0),
    )
    with pytest.raises(ValueError, match="expected logits"):
        sigmoid_focal_loss_dense(logits, target[0])
