"""Speed settings of the training loop: the optimizer kernel (``model.optimizer.implementation``)
and the memory format (``model.channels_last``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from knet_lightning.training.optim import OptimizerSettings, build_optimizer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1))


def _kernel(opt: torch.optim.Optimizer) -> str:
    group = opt.param_groups[0]
    return "fused" if group["fused"] else "foreach" if group["foreach"] else "for_loop"


def test_auto_is_fused_and_foreach_when_lightning_clips_under_mixed_precision() -> None:
    assert _kernel(build_optimizer(_net(), OptimizerSettings())) == "fused"
    assert _kernel(build_optimizer(_net(), OptimizerSettings(), clips_under_amp=True)) == "foreach"
    assert _kernel(build_optimizer(_net(), OptimizerSettings(implementation="for_loop"))) == "for_loop"


def test_explicit_fused_with_clipping_under_mixed_precision_names_both_settings() -> None:
    with pytest.raises(ValueError, match=r"implementation=fused.*gradient_clip_val"):
        build_optimizer(_net(), OptimizerSettings(implementation="fused"), clips_under_amp=True)


def test_unknown_implementation_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"implementation='fast'.*auto, fused, foreach, for_loop"):
        OptimizerSettings(implementation="fast")


def test_every_implementation_takes_the_same_steps() -> None:
    """Fused and foreach are speed-ups of the same AdamW update, decay groups and all."""
    x = torch.randn(2, 3, 9, 9)
    finals = {}
    for implementation in ("for_loop", "foreach", "fused"):
        net = _net()
        opt = build_optimizer(net, OptimizerSettings(lr=1e-2, implementation=implementation))
        for _ in range(5):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        finals[implementation] = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert not torch.equal(finals["for_loop"], torch.cat([p.detach().flatten() for p in _net().parameters()]))
    torch.testing.assert_close(finals["foreach"], finals["for_loop"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(finals["fused"], finals["for_loop"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("precision", "clip", "expected"),
    [
        ("32-true", 1.0, "fused"),
        ("bf16-mixed", None, "fused"),
        ("bf16-mixed", 1.0, "foreach"),
        ("16-mixed", 0.5, "foreach"),
    ],
)
def test_the_module_reads_precision_and_clipping_from_its_trainer(precision: str, clip: object, expected: str) -> None:
    from types import SimpleNamespace

    from knet_lightning.criterion import KNetCriterion
    from knet_lightning.models.knet import KNet
    from knet_lightning.module import KNetModule

    net = KNet(num_things=2, num_stuff=1, num_proposals=4, num_stages=1, backbone_depth=18, channels=16,
               num_groups=4, feedforward_channels=32, num_heads=2)  # fmt: skip
    module = KNetModule(net, KNetCriterion(2, 1), scheduler={"milestones": [], "milestone_unit": "step"})
    module._trainer = SimpleNamespace(precision=precision, gradient_clip_val=clip)  # type: ignore[assignment]
    assert _kernel(module.configure_optimizers()["optimizer"]) == expected


# ------------------------------------------------------------------ memory format
def _tiny_module(channels_last: object = "auto") -> KNetModule:  # noqa: F821
    from knet_lightning.criterion import KNetCriterion
    from knet_lightning.models.knet import KNet
    from knet_lightning.module import KNetModule

    net = KNet(num_things=2, num_stuff=1, num_proposals=4, num_stages=1, backbone_depth=18, channels=16,
               num_groups=4, feedforward_channels=32, num_heads=2)  # fmt: skip
    return KNetModule(net, KNetCriterion(2, 1), channels_last=channels_last)  # type: ignore[arg-type]


@pytest.mark.parametrize(("capability", "expected"), [("AVX2", False), ("AVX512", True), ("DEFAULT", False)])
def test_auto_memory_format_trains_nchw_on_avx2_cpus_and_channels_last_elsewhere(
    monkeypatch: pytest.MonkeyPatch, capability: str, expected: bool
) -> None:
    from knet_lightning.runtime.memory_format import prefers_channels_last

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert prefers_channels_last(torch.device("cpu"), training=True) is expected
    assert prefers_channels_last(torch.device("cpu"), training=False) is True  # inference: faster everywhere
    assert prefers_channels_last(torch.device("cuda")) is True
    module = _tiny_module()
    assert module.channels_last is None  # decided on the first device it meets
    module.train()(torch.zeros(1, 3, 64, 64))
    assert module.channels_last is expected
    stem = next(p for p in module.net.parameters() if p.dim() == 4)  # (64, 3, 7, 7)
    assert stem.is_contiguous(memory_format=torch.channels_last) is expected


def test_memory_format_setting_is_checked() -> None:
    with pytest.raises(ValueError, match=r"model.channels_last='yes'.*true, false or auto"):
        _tiny_module("yes")
    assert _tiny_module(False).channels_last is False


@pytest.mark.parametrize(("stage", "expected"), [("fit", False), ("test", True), ("predict", True)])
def test_auto_memory_format_on_an_avx2_cpu_follows_the_trainer_stage(
    monkeypatch: pytest.MonkeyPatch, stage: str, expected: bool
) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    module = _tiny_module()
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))  # type: ignore[assignment]
    module.setup(stage)
    assert module.channels_last is expected
