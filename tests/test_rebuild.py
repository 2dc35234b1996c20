"""One function rebuilds a module from a checkpoint (knet_lightning.checkpoint.rebuild, issue 28):
``mode=eval``, ``mode=predict``, ``Segmenter.from_checkpoint`` and ``mode=export`` all go through
it, under one policy for what a command line may change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_utils import compose_cfg, run_cfg, tiny_overrides
from PIL import Image

from knet_lightning import Segmenter
from knet_lightning.checkpoint import rebuild

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TRAIN = tiny_overrides("model.num_vis_images=0", "test_after_fit=false", "model.postprocess.object_mask_thr=0.05")
THR = "model.postprocess.object_mask_thr=0.42"


class _Stop(Exception):
    """Raised by the counting rebuild where the rest of the run is not needed (the export)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("rebuild")
    run_cfg(compose_cfg(tmp, TRAIN))
    images = tmp / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / "a.png")
    return tmp / "run" / "checkpoints" / "last.ckpt", images


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every call of ``rebuild_module``: its mode, whether a run's config came with it, and the
    post-processing threshold of the module it built; ``stop`` in a mode ends the run there."""
    original, seen = rebuild.rebuild_module, []

    def counting(source: Any, **kwargs: Any) -> rebuild.RebuiltModule:
        built = original(source, **kwargs)
        seen.append({"mode": kwargs.get("mode", "predict"), "config": kwargs.get("config") is not None,
                     "thr": built.module.task.settings.object_mask_thr})  # fmt: skip
        if kwargs.get("mode") == "export":
            raise _Stop
        return built

    monkeypatch.setattr(rebuild, "rebuild_module", counting)
    return seen


def test_eval_predict_segmenter_and_export_rebuild_through_one_function(
    trained: tuple[Path, Path], tmp_path: Path, calls: list[dict[str, Any]]
) -> None:
    ckpt, images = trained
    run_cfg(compose_cfg(tmp_path / "eval", [*TRAIN, f"ckpt_path={ckpt}", THR], config_name="eval"))
    run_cfg(compose_cfg(tmp_path / "predict", [*TRAIN, f"ckpt_path={ckpt}", f"inputs={images}", THR],
                        config_name="predict"))  # fmt: skip
    Segmenter.from_checkpoint(ckpt)
    with pytest.raises(_Stop):
        run_cfg(compose_cfg(tmp_path / "export", [*TRAIN, "mode=export", f"ckpt_path={ckpt}", THR]))
    # the same override gives eval and predict (and export) the same post-processing; the Segmenter
    # without a run keeps the checkpoint's
    assert calls == [
        {"mode": "eval", "config": True, "thr": 0.42},
        {"mode": "predict", "config": True, "thr": 0.42},
        {"mode": "predict", "config": False, "thr": 0.05},
        {"mode": "export", "config": True, "thr": 0.42},
    ]


def test_untyped_free_keys_are_the_checkpoints_in_eval_and_predict(
    trained: tuple[Path, Path], tmp_path: Path, calls: list[dict[str, Any]]
) -> None:
    """The config's default post-processing (0.3, tasks/settings.py) gives way to the checkpoint's 0.05
    where the command line does not set it, in eval as in predict."""
    ckpt, images = trained
    base = [o for o in TRAIN if not o.startswith("model.postprocess")]
    run_cfg(compose_cfg(tmp_path / "eval", [*base, f"ckpt_path={ckpt}"], config_name="eval"))
    run_cfg(compose_cfg(tmp_path / "predict", [*base, f"ckpt_path={ckpt}", f"inputs={images}"],
                        config_name="predict"))  # fmt: skip
    assert [c["thr"] for c in calls] == [0.05, 0.05]


def test_predict_on_onnxruntime_refuses_a_contradicting_override_before_exporting(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import knet_lightning.inference.onnx_export as onnx_export

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("exported before the override check")

    monkeypatch.setattr(onnx_export, "_exported_program", no_export)
    ckpt, images = trained
    cfg = compose_cfg(tmp_path, [*TRAIN, f"ckpt_path={ckpt}", f"inputs={images}", "predict.backend=onnxruntime",
                                 "model.num_proposals=50"], config_name="predict")  # fmt: skip
    with pytest.raises(ValueError, match=rf"mode=predict ckpt_path={ckpt}: the checkpoint's network differs in "
                                         r"model.num_proposals"):  # fmt: skip
        run_cfg(cfg)
