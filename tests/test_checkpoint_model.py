"""The model config stored in checkpoints and rebuilt for eval/predict (knet_lightning.checkpoint.model)."""

from __future__ import annotations

import pytest

from knet_lightning.checkpoint.model import flatten, model_config_for_checkpoint
from knet_lightning.settings import override_key

STORED = {
    "task": "panoptic",
    "num_proposals": 50,
    "net": {"num_things": 4, "num_stuff": 3, "num_proposals": 50, "channels": 64, "pretrained": True,
            "weights_path": "/old/r50.pth"},
    "postprocess": {"object_mask_thr": 0.3},
    "channels_last": "auto",
}  # fmt: skip


def _given(**changes: object) -> dict:
    given = {**STORED, "net": dict(STORED["net"]), "postprocess": {"object_mask_thr": 0.6}}
    for key, value in changes.items():
        *path, last = key.split("__")
        node = given
        for p in path:
            node = node[p]
        node[last] = value
    return given


@pytest.mark.parametrize(("item", "key"), [("model.num_stages=2", "model.num_stages"), ("+model.x=1", "model.x"),
                                         ("++model.x=a=b", "model.x"), ("~model.x", "model.x"),
                                         ("~model.x=3", "model.x"), ("trainer=ddp", "trainer"),
                                         ("hydra/launcher=submitit_slurm", "hydra/launcher")])  # fmt: skip
def test_override_key_names_what_the_command_line_sets(item: str, key: str) -> None:
    assert override_key(item) == key


def test_flatten_joins_nested_keys() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_the_checkpoint_network_with_the_free_keys_this_run_types() -> None:
    """One policy for eval and predict: the free keys the command line sets are this run's, every
    other key (the config's untyped defaults included) the checkpoint's."""
    given = _given(num_proposals=100, net__num_proposals=100, net__channels=256)
    built = model_config_for_checkpoint(given, STORED, "x.ckpt", "eval", overrides=["data.root=/d"])
    assert built["num_proposals"] == 50 and built["net"]["channels"] == 64
    assert built["postprocess"] == {"object_mask_thr": 0.3}
    typed = ["data.root=/d", "model.postprocess.object_mask_thr=0.6"]
    assert model_config_for_checkpoint(given, STORED, "x.ckpt", "eval", typed)["postprocess"] == {
        "object_mask_thr": 0.6
    }
    # the weights come from the checkpoint: no download, no initial weight file
    assert built["net"]["pretrained"] is False and built["net"]["weights_path"] is None


def test_checkpoints_without_a_stored_config_use_the_given_one() -> None:
    given = _given(net__channels=256)
    assert model_config_for_checkpoint(given, None, "x.ckpt", "predict", []) is given


@pytest.mark.parametrize(
    ("changes", "overrides", "named"),
    [
        ({"net__channels": 256}, ["model.net.channels=256"], "model.net.channels (checkpoint 64, here 256)"),
        ({"net__channels": 256}, ["+model.net=big"], "model.net.channels"),
        ({"net__num_things": 80}, [], "model.net.num_things (checkpoint 4, here 80)"),
        ({"task": "instance"}, [], "model.task (checkpoint 'panoptic', here 'instance')"),
    ],
)
def test_contradicting_overrides_and_other_classes_are_one_line_errors(
    changes: dict, overrides: list[str], named: str
) -> None:
    with pytest.raises(ValueError, match=r"^mode=eval ckpt_path=x.ckpt: the checkpoint's network differs in") as err:
        model_config_for_checkpoint(_given(**changes), STORED, "x.ckpt", "eval", overrides)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_model_group_choice_types_no_key_but_the_task_it_names() -> None:
    """Issue 27: ``model=knet_panoptic`` on the command line made every key in which the option's
    defaults differ from the checkpoint count as typed (``model.net.frozen_stages`` of a run trained
    with ``-1`` was refused as an override nobody typed). The option's values give way to the
    checkpoint's; only the task it chooses is compared, and named as typed."""
    overrides = ["model=knet_panoptic", "data=coco_panoptic", "data.eval_short_edge=64"]
    built = model_config_for_checkpoint(_given(net__channels=256), STORED, "x.ckpt", "eval", overrides)
    assert built["net"]["channels"] == 64
    with pytest.raises(
        ValueError, match=r"differs in model.task \(checkpoint 'panoptic', here 'instance'\);.*drop the overrides "
        r"model=knet_instance\. "
    ):  # fmt: skip
        model_config_for_checkpoint(_given(task="instance"), STORED, "x.ckpt", "eval", ["model=knet_instance"],
                                    data_bound=())  # fmt: skip
    # a typed key is compared whatever group choice comes with it
    with pytest.raises(ValueError, match=r"drop the overrides model.net.channels\. "):
        model_config_for_checkpoint(_given(net__channels=256), STORED, "x.ckpt", "eval",
                                    ["model=knet_panoptic", "model.net.channels=256"])  # fmt: skip


def test_free_and_weight_source_keys_may_differ_even_when_overridden() -> None:
    given = _given(channels_last=False, net__pretrained=False, net__weights_path=None)
    overrides = ["model.channels_last=false", "model.postprocess.object_mask_thr=0.6", "model.net.pretrained=false"]
    built = model_config_for_checkpoint(given, STORED, "x.ckpt", "eval", overrides)
    assert built["channels_last"] is False and built["postprocess"]["object_mask_thr"] == 0.6


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_older_checkpoints_with_a_task_argument_still_rebuild(task: str, tmp_path) -> None:
    """Configs stored before KNet and KNetCriterion stopped taking ``task`` (``net.task``,
    ``criterion.task``) upgrade to today's keys and build the same network and criterion."""
    import hydra
    from cli_utils import compose_cfg, tiny_overrides
    from omegaconf import OmegaConf

    from knet_lightning.checkpoint.model import upgrade_model_config

    today = OmegaConf.to_container(compose_cfg(tmp_path, tiny_overrides(f"model=knet_{task}")).model, resolve=True)
    legacy = {**today, "net": {**today["net"], "task": task}, "criterion": dict(today["criterion"])}
    legacy["criterion"].pop("stuff_kernels", None)
    legacy["criterion"]["task"] = task
    upgraded = upgrade_model_config(legacy)
    assert upgraded["net"] == today["net"] and "task" not in upgraded["criterion"]
    assert upgraded["criterion"]["stuff_kernels"] is (task == "panoptic")
    assert (
        model_config_for_checkpoint(today, legacy, "old.ckpt", "eval", [])["net"]["num_stuff"]
        == today["net"]["num_stuff"]
    )
    criterion = hydra.utils.instantiate(upgraded["criterion"])
    assert criterion.num_stuff_kernels == (today["net"]["num_stuff"] if task == "panoptic" else 0)
    assert hydra.utils.instantiate(upgraded["net"]).num_stuff == today["net"]["num_stuff"]


def test_on_the_checkpoints_own_data_set_only_typed_free_keys_replace_its_own() -> None:
    """mode=eval with the checkpoint's stored data config: the composed model group may be another
    task's (the default panoptic one for a semantic checkpoint), so its task and free keys give way
    to the checkpoint's, but for what the command line sets."""
    stored = {**STORED, "postprocess": {"object_mask_thr": 0.3, "overlap_thr": 0.7}}
    given = _given(task="semantic", postprocess={"object_mask_thr": 0.5, "overlap_thr": 0.6}, channels_last=False)
    built = model_config_for_checkpoint(given, stored, "x.ckpt", "eval", ["model.postprocess.object_mask_thr=0.5"],
                                        data_bound=())  # fmt: skip
    assert built["task"] == "panoptic" and built["channels_last"] == "auto"
    assert built["postprocess"] == {"object_mask_thr": 0.5, "overlap_thr": 0.7}
    # the same on another data set: task differences are refused
    with pytest.raises(
        ValueError,
        match=r"model.task \(checkpoint 'panoptic', here 'semantic'\); .* model.task follow "
        r"the data set: evaluate on one with the checkpoint's task and classes",
    ):
        model_config_for_checkpoint(given, stored, "x.ckpt", "eval", [])
