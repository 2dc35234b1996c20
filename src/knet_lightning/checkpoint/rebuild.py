"""The one way from a checkpoint to a ``KNetModule``: :func:`rebuild_module`, used by
``mode=eval``, ``mode=predict``, :meth:`~knet_lightning.Segmenter.from_checkpoint` and
``mode=export`` (:func:`~knet_lightning.inference.onnx_export.export_onnx`) alike.

The module class is named by the ``_target_`` of the model config the checkpoint stores
(``knet_lightning.module.KNetModule``) and instantiated through Hydra, so this layer imports no
module above it (``checkpoint`` sits below ``module``, see the package's layers).

What a command line may change is one policy (:func:`~knet_lightning.checkpoint.model.model_config_for_checkpoint`):
the keys that shape no weight (:data:`~knet_lightning.checkpoint.model.FREE_KEYS`: post-processing,
test-time strategy, ...) are free and only the ones the command line types replace the
checkpoint's; a typed key that contradicts the checkpoint's network is refused; every untyped
key comes from the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from knet_lightning.checkpoint.keys import CONVERSION_KEY, INFERENCE_KEY, MODEL_CONFIG_KEY
from knet_lightning.checkpoint.model import model_config_for_checkpoint, upgrade_model_config, without_initial_weights

log = logging.getLogger(__name__)

# keys of the model config that only parametrize the network by interpolation (the handles that
# sweeps vary); the network is their one consumer, the module is not built with them
MODEL_HANDLE_KEYS = ("num_proposals", "num_stages")


class RebuiltModule(NamedTuple):
    """A checkpoint's module (with its trained weights unless asked not to), the inference settings
    it is run with and whether ``mode=convert`` wrote it (published weights, whose numbers were
    computed in fp32)."""

    module: Any
    inference: dict[str, Any]
    converted: bool


def instantiate_module(model_cfg: Mapping[str, Any], class_names: Any, isthing: Any, colors: Any, **kwargs: Any) -> Any:
    """The module of the ``model`` config ``model_cfg`` (its :data:`MODEL_HANDLE_KEYS` left out)
    with the class metadata; the config is kept on it (``model_config``) for every checkpoint it
    writes, for this module's functions to rebuild it."""
    import hydra

    built = {k: v for k, v in model_cfg.items() if k not in MODEL_HANDLE_KEYS}
    module = hydra.utils.instantiate(built, class_names=class_names, isthing=isthing, colors=colors,
                                     _convert_="partial", **kwargs)  # fmt: skip
    module.model_config = dict(model_cfg)
    return module


def _default_inference(num_classes: int) -> dict[str, Any]:
    from knet_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return {"short_edge": None, "max_size": None, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "size_divisor": 32, "dataset_ids": list(range(1, num_classes + 1))}  # fmt: skip


def _inference(entry: Mapping[str, Any], path: Any, num_classes: int) -> dict[str, Any]:
    from knet_lightning.data.resize import LEGACY_BACKEND

    inference = entry.get(INFERENCE_KEY)
    if inference is None:
        inference = _default_inference(num_classes)
        log.warning("%s has no '%s' entry (written before it existed): assuming no resize, ImageNet "
                    "normalisation and size divisor 32", path, INFERENCE_KEY)  # fmt: skip
    inference = dict(inference)
    # checkpoints written before the resize's arithmetic was stored were evaluated with torchvision's
    inference.setdefault("resize_backend", LEGACY_BACKEND)
    return inference


def checkpoint_model_config(
    entry: Mapping[str, Any],
    path: Any,
    config: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    mode: str = "predict",
    data_bound: Iterable[str] = (),
) -> dict[str, Any]:
    """The model config to build for the checkpoint ``entry`` (read from ``path``): the stored one,
    with what this run's command line (``overrides``) may change of it in ``config`` (the run's
    resolved ``model`` config; None: no run, the stored config as it is). Refuses a typed key
    that contradicts the checkpoint's network, and a ``data_bound`` key that differs."""
    stored = entry.get(MODEL_CONFIG_KEY) if isinstance(entry, Mapping) else None
    if config is None:
        if not isinstance(stored, Mapping):
            raise ValueError(
                f"{path}: no '{MODEL_CONFIG_KEY}' entry; only checkpoints written by knet-lightning (training runs, "
                "mode=convert) can be rebuilt without a config"
            )
        return upgrade_model_config(stored)  # older checkpoints' keys in today's names
    return model_config_for_checkpoint(dict(config), stored, str(path), mode, overrides, data_bound)


def rebuild_module(
    source: str | Path | Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    mode: str = "predict",
    data_bound: Iterable[str] = (),
    class_info: Any = None,
    trusted: bool = False,
    weights: bool = True,
    **module_kwargs: Any,
) -> RebuiltModule:
    """The ``KNetModule`` of a training run's or ``mode=convert``'s checkpoint.

    Args:
        source: the checkpoint file, or its loaded entry (a mapping).
        config / overrides / mode / data_bound: this run's ``model`` config and command line
            (:func:`checkpoint_model_config`); the check runs before anything is built.
        class_info: the evaluated data set's classes (``names``, ``isthing``, ``colors``); None:
            the checkpoint's (``hyper_parameters``), and the checkpoint must store its model config.
        trusted: load with full pickle (only for files you trust).
        weights: load the network's trained weights (``mode=eval`` leaves them to Lightning,
            which restores the whole checkpoint).
        module_kwargs: further module arguments (``max_bad_steps``, ``compile``).
    """
    from knet_lightning.checkpoint.io import load_checkpoint_file

    path = "<checkpoint entry>" if isinstance(source, Mapping) else source
    entry = source if isinstance(source, Mapping) else load_checkpoint_file(source, trusted=trusted)
    if class_info is None and not isinstance(entry.get(MODEL_CONFIG_KEY), Mapping):
        checkpoint_model_config(entry, path)  # refused: without a data set, the classes are the checkpoint's
    model_cfg = checkpoint_model_config(entry, path, config, overrides, mode, data_bound)
    if class_info is None:
        hparams = entry.get("hyper_parameters") or {}
        classes = (hparams.get("class_names"), hparams.get("isthing"), hparams.get("colors"))
    else:
        classes = (list(class_info.names), list(class_info.isthing), [list(c) for c in class_info.colors])
    module = instantiate_module(without_initial_weights(model_cfg), *classes, **module_kwargs)
    module.model_config = model_cfg  # as a training run's module holds it (export_onnx reads it)
    if weights:
        state = {k.removeprefix("net."): v for k, v in entry["state_dict"].items() if k.startswith("net.")}
        module.net.load_state_dict(state, strict=True)
    inference = _inference(entry, path, len(module.class_names))
    return RebuiltModule(module, inference, CONVERSION_KEY in entry)
