"""The model a checkpoint was trained with: stored in every checkpoint, and the config that
eval, predict, the Segmenter and ``mode=export`` rebuild it from (:func:`model_config_for_checkpoint`;
the rebuild itself is :func:`knet_lightning.checkpoint.rebuild.rebuild_module`).

A checkpoint's weights only fit the network they were trained in. ``mode=eval`` and
``mode=predict`` therefore build the network from the model config stored in the checkpoint
(:data:`~knet_lightning.checkpoint.keys.MODEL_CONFIG_KEY`, written by ``KNetModule.on_save_checkpoint``), not from the config
of the command line. The command line may still change what does not touch the weights
(:data:`FREE_KEYS`: post-processing, evaluation, test-time strategy, memory format, losses,
optimizer): what it types replaces the checkpoint's, everything else is the checkpoint's; a model
override that contradicts the checkpoint is a one-line error naming the keys.
:mod:`~knet_lightning.checkpoint.rebuild` builds the module from that config.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from knet_lightning.settings import override_key

log = logging.getLogger(__name__)

# model.* keys that may differ from the checkpoint's: they do not shape any weight
FREE_KEYS = (
    "postprocess",
    "eval_all_stages",
    "num_vis_images",
    "channels_last",
    "optimizer",
    "scheduler",
    "criterion",
    # how validation, test and predict run the network (whole, slide, multi-scale + flip)
    "test_time",
)
# where a network's initial weights come from; the checkpoint's weights replace them
WEIGHT_SOURCE_KEYS = ("net.pretrained", "net.weights_path")
# keys that must match the data set being evaluated, whoever set them
DATA_BOUND_KEYS = ("task", "net.num_things", "net.num_stuff", "net.num_classes")
# what the `task` argument that KNet and KNetCriterion took before stored configs lost it meant:
# whether the network has stuff kernels (learned with the rank loss)
_LEGACY_TASK_STUFF_KERNELS = {"panoptic": True, "instance": False}


def upgrade_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored model config in today's keys, so that older checkpoints still rebuild: their
    ``net.task`` (the network had no stuff kernels for ``instance``) and ``criterion.task``
    (now ``criterion.stuff_kernels``)."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    net, criterion = out.get("net"), out.get("criterion")
    if isinstance(net, dict) and "task" in net and not _LEGACY_TASK_STUFF_KERNELS.get(net.pop("task"), True):
        net["num_stuff"] = 0
    if isinstance(criterion, dict) and "task" in criterion:
        criterion["stuff_kernels"] = _LEGACY_TASK_STUFF_KERNELS.get(criterion.pop("task"), True)
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"net": {"channels": 256}}`` -> ``{"net.channels": 256}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _structural(flat: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in flat.items()
        if k.split(".", 1)[0] not in FREE_KEYS and k not in WEIGHT_SOURCE_KEYS
    }  # fmt: skip


def _typed_as(key: str, overrides: Iterable[str]) -> str | None:
    """The command-line override that sets ``model.<key>`` (``model.x=..``, ``+model.x=..``,
    ``~model.x``, or one of a parent such as ``model.net=..``), as the error should name it; None
    where none does. The group choice ``model=<option>`` types no key: its values are the option's
    defaults, which the checkpoint's replace (a COCO run trained with ``model.net.frozen_stages=-1``
    evaluates with ``model=knet_panoptic`` typed); it types the task it names, which it is there to
    choose."""
    full = f"model.{key}"
    for item in overrides:
        name = override_key(item)
        if name == "model":
            if key == "task":
                return item.lstrip("+~")
            continue
        if full == name or full.startswith(name + "."):
            return full
    return None


def model_config_for_checkpoint(
    given: dict[str, Any],
    stored: Mapping[str, Any] | None,
    ckpt_path: str,
    mode: str,
    overrides: Iterable[str],
    data_bound: Iterable[str] = DATA_BOUND_KEYS,
) -> dict[str, Any]:
    """The model config to build for evaluating or predicting with ``ckpt_path``.

    Args:
        given: the resolved ``model`` config of this run.
        stored: the checkpoint's (:data:`~knet_lightning.checkpoint.keys.MODEL_CONFIG_KEY`); None for checkpoints written
            before it was stored, or by other tools: ``given`` is used as it is.
        overrides: this run's command-line overrides (Hydra's ``overrides.task``).
        data_bound: the keys that must match the evaluated data set whoever set them
            (:data:`DATA_BOUND_KEYS`; none where the data set is the checkpoint's own or there is
            none, as for ``mode=predict``).

    Returns:
        ``stored``, with the :data:`FREE_KEYS` (or their fields) that the command line sets taken
        from ``given``; every key the command line does not set is the checkpoint's.

    Raises:
        ValueError: ``given`` differs from ``stored`` in a key that shapes the weights and the
            command line set that key, or the key must match the data set (task, classes).
    """
    if stored is None:
        return given
    stored = upgrade_model_config(stored)
    mine, theirs = _structural(flatten(given)), _structural(flatten(stored))
    differing = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    overrides, data_bound = list(overrides), set(data_bound)
    typed_as = {k: name for k in differing if (name := _typed_as(k, overrides))}
    typed = list(typed_as)
    bound = [k for k in differing if k in data_bound and k not in typed]
    if typed or bound:

        def listed(keys: list[str]) -> str:
            return ", ".join(f"model.{k} (checkpoint {theirs.get(k)!r}, here {mine.get(k)!r})" for k in keys)

        reasons = [f"drop the overrides {', '.join(typed_as.values())}"] if typed else []
        if bound:
            reasons.append(f"{', '.join(f'model.{k}' for k in bound)} follow the data set: evaluate on one with the "
                           "checkpoint's task and classes (without data= or experiment=, the checkpoint's own)")  # fmt: skip
        raise ValueError(
            f"mode={mode} ckpt_path={ckpt_path}: the checkpoint's network differs in {listed(typed + bound)}; its "
            f"weights only fit the network they were trained in, which mode={mode} rebuilds from the checkpoint: "
            f"{'; '.join(reasons)}. Only model.{{{','.join(FREE_KEYS)}}} may change"
        )
    if differing:
        log.info(
            "mode=%s: the network is built as the checkpoint was trained: %s",
            mode,
            ", ".join(f"model.{k}={theirs.get(k)!r} (the config says {mine.get(k)!r})" for k in differing),
        )
    merged = {k: v for k, v in stored.items() if k not in FREE_KEYS}
    # one policy for eval and predict: the composed model group may be another task's or hold other
    # defaults, so the free keys stay the checkpoint's but for what the command line sets in them
    merged.update(_with_typed_free_keys(stored, given, overrides))
    return without_initial_weights(merged)


def _with_typed_free_keys(stored: Mapping[str, Any], given: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The :data:`FREE_KEYS` of ``stored``, with each ``model.<free key>[.<path>]`` the command line
    sets taken from ``given``."""
    out = {k: copy.deepcopy(stored[k]) for k in FREE_KEYS if k in stored}
    for name in map(override_key, overrides):
        parts = name.split(".")
        if len(parts) < 2 or parts[0] != "model" or parts[1] not in FREE_KEYS or parts[1] not in given:
            continue
        if len(parts) == 2 or not isinstance(out.get(parts[1]), dict):
            out[parts[1]] = copy.deepcopy(given[parts[1]])
            continue
        src, dst = given[parts[1]], out[parts[1]]
        for part in parts[2:-1]:
            src, dst = src[part], dst.setdefault(part, {})
        dst[parts[-1]] = copy.deepcopy(src[parts[-1]])
    return out


def without_initial_weights(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """``model_cfg`` with ``net.pretrained=false`` and ``net.weights_path=null``: for a network
    whose weights come from a checkpoint (eval, predict, ``load_from``, ``mode=convert``), so
    that nothing is downloaded or read only to be overwritten."""
    net = dict(model_cfg.get("net") or {})
    if "pretrained" in net:
        net["pretrained"] = False
    if "weights_path" in net:
        net["weights_path"] = None
    return {**model_cfg, "net": net} if net else dict(model_cfg)


def load_network_weights(module: Any, path: str, trusted: bool = False, strict: bool = True) -> None:
    """``load_from=``: copy the network weights of checkpoint ``path`` (ours, or one that
    ``mode=convert`` wrote) into ``module.net``; optimizer, schedule and epoch start afresh.

    ``strict`` (``load_from_strict``, the default): the checkpoint's network must be this config's
    (same keys and shapes); anything else is one error naming the file and the keys. Not strict
    (to fine-tune on another data set, as MMDetection's ``load_from`` and detectron2's
    ``MODEL.WEIGHTS`` do): every tensor whose name and shape match is loaded, the rest of the
    network keeps its initialisation (e.g. the classifier and the stuff kernels of another class
    list), and a warning lists what was left out; a checkpoint that shares no tensor is an error.
    """
    from knet_lightning.checkpoint.convert.mapping import ConversionError, KeyMapping, convert_state_dict, key_listing
    from knet_lightning.checkpoint.io import load_checkpoint_file

    checkpoint = load_checkpoint_file(path, trusted=trusted)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"load_from={path}: not a knet-lightning checkpoint (no 'state_dict')")
    net_state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    target = module.net.state_dict()
    if strict:
        same = KeyMapping([("{rest}", "{rest}")], name="load_from")
        try:
            loaded = convert_state_dict(net_state, target, same, f"load_from={path}")
        except ConversionError as error:
            raise ConversionError(f"{error}; with load_from_strict=false the tensors whose names and shapes match "
                                  "are loaded and the rest keeps its initialisation (to fine-tune on other "
                                  "classes)") from None  # fmt: skip
        module.net.load_state_dict(loaded)
        log.info("load_from=%s: network weights loaded; optimizer and schedule start afresh", path)
        return
    loaded = {k: v for k, v in net_state.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    if not loaded:
        raise ConversionError(f"load_from={path}: no tensor of its network has a name and shape of this network's "
                              f"({len(net_state)} tensors, e.g. {key_listing(list(net_state)[:3])})")  # fmt: skip
    module.net.load_state_dict(loaded, strict=False)
    shapes = [f"{k} {tuple(net_state[k].shape)} -> {tuple(target[k].shape)}"
              for k in net_state if k in target and k not in loaded]  # fmt: skip
    absent = [k for k in target if k not in net_state]
    unused = [k for k in net_state if k not in target]
    left = [f"{len(shapes)} of another shape: {key_listing(shapes)}"] if shapes else []
    left += [f"{len(absent)} not in the checkpoint: {key_listing(absent)}"] if absent else []
    left += [f"{len(unused)} checkpoint tensors with no place here: {key_listing(unused)}"] if unused else []
    log.log(logging.WARNING if left else logging.INFO,
            "load_from=%s (not strict): %d of %d network tensors loaded; optimizer and schedule start afresh%s",
            path, len(loaded), len(target), "; left as initialised: " + "; ".join(left) if left else "")  # fmt: skip
