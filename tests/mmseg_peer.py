"""MMSegmentation 1.x's K-Net as a reference peer for parity tests.

The peer (``mmsegmentation==1.2.2``, ``mmcv-lite==2.1.0``, ``mmengine==0.10.7``) is a
required test dependency, installed by ``make install`` (``PEER_SPEC``/``PEER_DEPS`` in
the Makefile). Nothing here downloads anything, and nothing is written into
site-packages: mmcv-lite's missing compiled ops are stood in for in-process.

Typical use::

    model = build_mmseg_knet("upernet", num_classes=5)
    randomize_(model, seed=0)
    stages = mmseg_stage_logits(model, images)  # S + 1 tensors, before any resize
"""

from __future__ import annotations

import copy
import importlib.machinery
import math
import sys
import time
import types
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# short name -> config file of MMSegmentation 1.2.2 (``<mmseg>/.mim/configs/knet/``)
KNET_CONFIGS: dict[str, str] = {
    "fcn": "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512.py",
    "pspnet": "knet-s3_r50-d8_pspnet_8xb2-adamw-80k_ade20k-512x512.py",
    "deeplabv3": "knet-s3_r50-d8_deeplabv3_8xb2-adamw-80k_ade20k-512x512.py",
    "upernet": "knet-s3_r50-d8_upernet_8xb2-adamw-80k_ade20k-512x512.py",
    "swin-t": "knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512.py",
    "swin-l": "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-512x512.py",
}

IGNORE_INDEX = 255
_INSTALL_HINT = (
    "MMSegmentation 1.x (the K-Net reference peer of the parity tests) is not importable: "
    "run `make install` (it installs PEER_SPEC with --no-deps and PEER_DEPS into the venv)"
)
_registered = False


def _install_mmcv_ext_stand_in() -> None:
    """Register an in-process ``mmcv._ext`` whose every op raises ``NotImplementedError``.

    mmcv-lite ships no compiled ops, and ``mmcv.ops`` (imported by ``mmseg.models``) loads
    them at import time; no layer of the R50 K-Net models calls one.
    """
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext")
    ext.__doc__ = "Stand-in for mmcv's compiled ops (mmcv-lite has none); every op raises."
    # a spec without a loader: pkgutil.find_loader("mmcv._ext") (mmengine's
    # mmcv_full_available) then answers None, i.e. "no mmcv-full", instead of raising
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)

    def __getattr__(name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)

        def _missing(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(f"mmcv._ext.{name}: compiled mmcv op (mmcv-lite has none)")

        return _missing

    ext.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules["mmcv._ext"] = ext
    import mmcv

    mmcv._ext = ext  # type: ignore[attr-defined]  (as a real submodule import would)


def import_mmseg() -> types.ModuleType:
    """Import ``mmseg`` with its models registered (idempotent); returns the ``mmseg`` module.

    Raises:
        ImportError: the peer is not installed (run ``make install``). Tests do not skip on
            this: the peer is a required test dependency.
    """
    global _registered
    try:
        import mmcv  # noqa: F401
        import mmengine  # noqa: F401
        import mmseg
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    if not _registered:
        _install_mmcv_ext_stand_in()
        import mmseg.models
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=True)
        _registered = True
    return mmseg


def config_path(name: str) -> Path:
    """The installed MMSegmentation config file of the K-Net model ``name`` (see KNET_CONFIGS)."""
    mmseg = import_mmseg()
    if name not in KNET_CONFIGS:
        raise KeyError(f"unknown K-Net config {name!r}; expected one of {sorted(KNET_CONFIGS)}")
    path = Path(mmseg.__file__).parent / ".mim" / "configs" / "knet" / KNET_CONFIGS[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mmsegmentation")
    return path


def _walk(node: Any) -> Iterator[Any]:
    """Every dict and list node of a (nested) config, depth first, the root included."""
    yield node
    children = node.values() if isinstance(node, Mapping) else node if isinstance(node, list) else ()
    for child in children:
        if isinstance(child, (Mapping, list)):
            yield from _walk(child)


def load_knet_config(name: str, num_classes: int | None = None, keep_preprocessor: bool = False) -> Any:
    """The mmengine ``Config`` of ``name``, adapted to a single CPU process.

    ``data_preprocessor`` is popped from the model (inputs are fed already normalized) unless
    ``keep_preprocessor`` (for MMSegmentation's whole test path, ``init_mmseg_model``), every ``SyncBN`` becomes ``BN`` (there is no process group), ``pretrained`` is None and
    no ``init_cfg`` points at a checkpoint (nothing downloads), and, if given,
    ``num_classes`` replaces every ``num_classes`` in the model config (the kernel generate
    head, the three kernel update heads and the auxiliary head).
    """
    import_mmseg()
    from mmengine.config import Config

    cfg = Config.fromfile(str(config_path(name)))
    model = cfg.model
    if not keep_preprocessor:
        model.pop("data_preprocessor", None)
    model.pretrained = None
    for key in cfg.keys():  # the model and the top-level ``norm_cfg`` variable
        for node in _walk(cfg[key]):
            if isinstance(node, Mapping) and node.get("type") == "SyncBN":
                node["type"] = "BN"
    for node in _walk(model):
        if not isinstance(node, Mapping):
            continue
        if num_classes is not None and "num_classes" in node:
            node["num_classes"] = num_classes
        if "init_cfg" in node and node["init_cfg"] is not None:
            node["init_cfg"] = None
    return cfg


def relative_position_index(window: int) -> Tensor:
    """``(w*w, w*w)`` index of Swin's relative position bias table (its ``relative_position_index``
    buffer): ``(dy + w - 1) * (2w - 1) + (dx + w - 1)`` for the offsets of two window positions."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None] + window - 1) * (2 * window - 1) + (xs[:, None] - xs[None] + window - 1)


@contextmanager
def _linspace_on_cpu() -> Iterator[None]:
    """``torch.linspace`` on the CPU inside a meta-device build: MMSegmentation's SwinTransformer
    reads its stochastic-depth rates with ``.item()``, which a meta tensor cannot give."""
    linspace = torch.linspace

    def cpu_linspace(*args: Any, **kwargs: Any) -> Tensor:
        kwargs.setdefault("device", "cpu")
        return linspace(*args, **kwargs)

    torch.linspace = cpu_linspace  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.linspace = linspace  # type: ignore[assignment]


def build_mmseg_knet(name: str, num_classes: int | None = None, init: str = "default") -> nn.Module:
    """MMSegmentation's K-Net ``name`` (fcn, pspnet, deeplabv3, upernet), in eval mode, on CPU.

    Built with ``mmseg.registry.MODELS`` from its own config file (see ``load_knet_config``
    for the adaptations). ``init``:

    - ``"default"``: the weights ``MODELS.build`` leaves, i.e. each layer's PyTorch
      default (mmcv's ConvModule applies its Kaiming init in its constructor);
    - ``"mmseg"``: then ``model.init_weights()``, MMSegmentation's own initialisation
      (Kaiming backbone convs, normal(0, 0.01) ``conv_seg``; nothing is downloaded since
      ``pretrained`` is None);
    - ``"empty"``: built on the meta device and allocated uninitialised (BN
      ``num_batches_tracked`` zeroed): only for a model that ``randomize_`` or a checkpoint
      fills right away; it skips the default init's random draws (about 1 s per model).

    The config used is kept as ``model.peer_cfg`` (``save_mmseg_checkpoint`` stores it).
    """
    import_mmseg()
    from mmseg.registry import MODELS

    if init not in ("default", "mmseg", "empty"):
        raise ValueError(f"init must be 'default', 'mmseg' or 'empty', not {init!r}")
    cfg = load_knet_config(name, num_classes)
    if init == "empty":
        with torch.device("meta"), _linspace_on_cpu():
            model = MODELS.build(cfg.model)
        model = model.to_empty(device="cpu")
        for bname, buf in model.named_buffers():
            if bname.endswith("num_batches_tracked"):
                buf.zero_()
            elif bname.endswith("relative_position_index"):  # Swin's: a constant of the window
                buf.copy_(relative_position_index(math.isqrt(buf.shape[0])))
    else:
        model = MODELS.build(cfg.model)
        if init == "mmseg":
            model.init_weights()
    model.peer_cfg = cfg
    model.peer_name = name
    return model.eval()


def _tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from ``seed`` and the tensor's name (independent of module order)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic random weights for every parameter and BN statistic of ``model``; in place.

    Each tensor draws from its own generator seeded by ``seed`` and its state_dict name, so a
    tensor's values do not depend on the other tensors (e.g. on ``num_classes``):

    - weights with 2+ dims (convs, linears, attention in-projections): N(0, 1/fan_in),
      fan_in = numel / shape[0];
    - 1-dim weights (BatchNorm, LayerNorm): U(0.5, 1.5);
    - biases (all 1-dim non-weights): N(0, 0.1);
    - BN ``running_mean`` ~ N(0, 0.1), ``running_var`` ~ U(0.5, 2); ``num_batches_tracked``
      unchanged.

    With unit-variance inputs the backbone features keep a standard deviation of about
    0.5-0.75 through all 16 bottlenecks (the ReLU halves each conv's output variance, the
    residual additions restore it), and the logits of every stage stay O(1-30): max
    |logit| about 0.7-2 for the kernel generate head and 7-25 for the update stages
    (checked by ``tests/test_mmseg_peer.py``). Returns ``model``.
    """
    for pname, param in model.named_parameters():
        gen = _tensor_generator(seed, pname)
        if param.dim() > 1:
            param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=gen)
        elif pname.endswith("weight"):
            param.uniform_(0.5, 1.5, generator=gen)
        else:
            param.normal_(0.0, 0.1, generator=gen)
    for bname, buf in model.named_buffers():
        gen = _tensor_generator(seed, bname)
        if bname.endswith("running_mean"):
            buf.normal_(0.0, 0.1, generator=gen)
        elif bname.endswith("running_var"):
            buf.uniform_(0.5, 2.0, generator=gen)
    return model


@contextmanager
def _all_stages(head: nn.Module) -> Iterator[None]:
    """Make ``IterativeDecodeHead.forward`` return every stage while its submodules stay as they are.

    mmseg's ``IterativeDecodeHead.forward`` collects ``stage_segs`` = [kernel generate head's
    logits, kernel update head 1, ..., S] and returns all of them when ``self.training``,
    else only the last. Only the head's own flag is flipped (not its children's), so BN,
    dropout and everything else stay in the mode the caller chose.
    """
    was = head.training
    head.training = True
    try:
        yield
    finally:
        head.training = was


@torch.no_grad()
def mmseg_stage_logits(model: nn.Module, images: Tensor) -> list[Tensor]:
    """The semantic logits of every stage, before any resize to the input size.

    ``images``: float (B, 3, H, W), already normalized (MMSegmentation's data preprocessor
    is skipped). Returns S + 1 tensors (B, num_classes, h, w) at the decode feature
    resolution (H/8 x W/8 for the R50-D8 models, H/4 x W/4 for UPerNet): the kernel
    generate head's logits (``conv_seg`` on its features), then each kernel update head's.
    They come from mmseg's own ``extract_feat`` and ``IterativeDecodeHead.forward`` (run
    with the head's ``training`` flag set, see ``_all_stages``); call it with the model in
    eval mode for deterministic outputs.
    """
    feats = model.extract_feat(images)
    with _all_stages(model.decode_head):
        stages = model.decode_head(feats)
    return list(stages)


def _data_samples(labels: Tensor) -> list[Any]:
    """SegDataSample per image with ``gt_sem_seg`` = the (H, W) label map, as mmseg packs them."""
    import_mmseg()
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for label in labels:
        h, w = label.shape
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=label[None].long())
        samples.append(sample)
    return samples


def mmseg_losses(model: nn.Module, images: Tensor, labels: Tensor, train: bool = False) -> dict[str, Tensor]:
    """The losses mmseg's ``EncoderDecoder.loss`` computes for ``images`` and (B, H, W) ``labels``.

    Keys, as mmseg names them: ``decode.loss_ce.s{i}`` and ``decode.acc_seg.s{i}`` for
    i = 0 (kernel generate head) .. S (last kernel update head), ``aux.loss_ce`` and
    ``aux.acc_seg``. mmengine's ``parse_losses`` sums every key containing ``loss`` into
    the total that is back-propagated (``acc_seg`` is a logged accuracy in %, not a loss).

    How each ``loss_ce`` is computed (``BaseDecodeHead.loss_by_feat`` and mmseg's
    ``CrossEntropyLoss`` with the K-Net configs): the logits (B, C, h, w) are resized to
    the label size with bilinear ``F.interpolate(..., align_corners=False)`` (the heads'
    ``align_corners``); per-pixel ``F.cross_entropy(reduction='none', ignore_index=255)``,
    no class weights; then ``avg_non_ignore=False`` (the default): the sum is divided by
    ALL B*H*W pixels, ignored ones included (+ float32 eps), not by the non-ignored count
    as PyTorch's mean would. Times ``loss_weight``: 1.0 for every decode stage (each stage
    uses the kernel generate head's ``loss_decode``), 0.4 for the auxiliary FCN head
    (on backbone stage 3, 1024 channels).

    ``train=False`` (default): deterministic; every module stays in eval mode (BN running
    statistics, no dropout) except the decode head's own ``training`` flag, so the stage
    logits are exactly ``mmseg_stage_logits``'s. ``train=True`` runs the model in train
    mode as mmseg's training does (BN batch statistics, which also updates the running
    statistics in place; ``Dropout2d(0.1)`` before each ``conv_seg``, random, so seed
    torch beforehand), then restores the previous mode.
    """
    samples = _data_samples(labels)
    was_training = model.training
    try:
        if train:
            model.train()
            return dict(model.loss(images, samples))
        with _all_stages(model.decode_head):
            return dict(model.loss(images, samples))
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------
# checkpoints as mmengine's Runner.save_checkpoint + CheckpointHook write them
# --------------------------------------------------------------------------------------

# What torch.load(weights_only=True) refuses in a checkpoint that mmengine 0.10.7's Runner
# + CheckpointHook write (numpy 2.x names; numpy 1.x writes ``numpy.core.multiarray.*``).
# All of it is under ``message_hub``; ``meta``, ``state_dict``, ``optimizer`` and
# ``param_schedulers`` (MultiStepLR's ``milestones`` is a collections.Counter, allowed)
# load with weights_only=True as they are.
#   - HistoryBuffer: every ``message_hub['log_scalars'][...]`` value;
#   - builtins.getattr: HistoryBuffer.__getstate__ adds ``statistics_methods``
#     ({'min': HistoryBuffer.min, ...}), functions pickled as getattr(HistoryBuffer, 'min');
#   - numpy ndarray / _reconstruct / dtype (+ the Float64DType and Int64DType classes, which
#     get_unsafe_globals_in_checkpoint does not list): HistoryBuffer's ``_log_history``
#     (float64) and ``_count_history`` (int64) arrays;
#   - numpy scalar: ``message_hub['runtime_info']['eta']`` is a numpy.float64.
# mmengine's own load_checkpoint calls torch.load(filename, map_location) without
# weights_only, so under torch >= 2.6 it fails on such a file unless these are allowlisted
# (``mmengine_safe_globals``) or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set.
WEIGHTS_ONLY_UNSAFE_GLOBALS: tuple[str, ...] = (
    "mmengine.logging.history_buffer.HistoryBuffer",
    "builtins.getattr",
    "numpy.ndarray",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Int64DType",
    "numpy._core.multiarray.scalar",
)


def mmengine_safe_globals() -> list[Any]:
    """The objects to pass to ``torch.serialization.safe_globals`` to load an mmengine
    Runner checkpoint (ours or a real one) with ``weights_only=True``; see
    ``WEIGHTS_ONLY_UNSAFE_GLOBALS``."""
    import numpy as np

    import_mmseg()
    from mmengine.logging import HistoryBuffer

    return [
        HistoryBuffer,
        getattr,
        np.ndarray,
        np._core.multiarray._reconstruct,
        np.dtype,
        type(np.dtype(np.float64)),
        type(np.dtype(np.int64)),
        np._core.multiarray.scalar,
    ]


def ade20k_palette(num_classes: int) -> list[list[int]]:
    """ADE20K's palette (``ADE20KDataset.METAINFO``), cycled to ``num_classes`` entries."""
    import_mmseg()
    from mmseg.datasets import ADE20KDataset

    palette = [list(rgb) for rgb in ADE20KDataset.METAINFO["palette"]]
    return [palette[i % len(palette)] for i in range(num_classes)]


def _loss_log_names(model: nn.Module) -> list[str]:
    """The keys of mmseg's loss dict for this model, in the order ``EncoderDecoder.loss`` gives them."""
    names = []
    for i in range(model.decode_head.num_stages + 1):
        names += [f"decode.loss_ce.s{i}", f"decode.acc_seg.s{i}"]
    if getattr(model, "auxiliary_head", None) is not None:
        names += ["aux.loss_ce", "aux.acc_seg"]
    return names


def save_mmseg_checkpoint(
    model: nn.Module,
    path: str | Path,
    classes: Sequence[str],
    palette: Sequence[Sequence[int]] | None = None,
    iters: int = 2,
    seed: int = 0,
    reduce_zero_label: bool = True,
    save_optimizer: bool = True,
    save_param_scheduler: bool = True,
) -> dict[str, Any]:
    """Write ``model`` to ``path`` as mmengine's ``Runner.save_checkpoint`` (called by
    ``CheckpointHook(by_epoch=False)``, MMSegmentation's default) does after ``iters``
    training iterations; returns the dict saved.

    The checkpoint (keys and types as in a checkpoint that a real Runner wrote after 2
    iterations of this config, see /tmp/mmseg_peer_report.md):

    - ``meta`` (dict): ``epoch`` (int, 0 for iteration-based training), ``iter`` (int,
      ``iters``), ``cfg`` (str, the config's ``pretty_text``), ``seed`` (int),
      ``experiment_name`` (str, ``<config stem>_<YYYYmmdd_HHMMSS>``), ``time`` (str),
      ``mmengine_version`` (str: the version + the git hash of the current directory's
      repository, if any), ``dataset_meta`` (dict: ``classes`` tuple of str, ``palette``
      list of [r, g, b] int lists, ``label_map`` None, ``reduce_zero_label`` bool);
    - ``state_dict``: the model's (an OrderedDict with ``_metadata``, CPU tensors);
    - ``message_hub``: ``MessageHub.state_dict()``: ``log_scalars`` (OrderedDict of str ->
      mmengine HistoryBuffer: ``train/lr``, ``train/data_time``, ``train/grad_norm``,
      ``train/loss``, ``train/<loss and acc names>``, ``train/time``), ``runtime_info``
      (OrderedDict: cfg, seed, experiment_name, mmengine_version, loop_stage, epoch,
      iter, max_epochs, max_iters, dataset_meta, ``eta`` — a numpy.float64 —,
      last_ckpt), ``resumed_keys`` (OrderedDict of str -> True);
    - ``optimizer``: ``OptimWrapper.state_dict()`` = the AdamW state dict (``state``:
      int -> {step, exp_avg, exp_avg_sq} tensors; one ``param_groups`` entry);
    - ``param_schedulers``: list of the LinearLR and MultiStepLR state dicts (plain
      Python values; MultiStepLR's ``milestones`` is a collections.Counter).

    Real mmengine objects produce every part: a MessageHub updated as RuntimeInfoHook,
    IterTimerHook, OptimWrapper (gradient clipping logs ``grad_norm``) and CheckpointHook
    update it; the OptimWrapper and param schedulers built from the config and stepped
    ``iters`` times on a copy of the model with synthetic gradients (``model`` itself is
    not changed); mmengine's ``save_checkpoint``. The logged values (losses, times) are
    synthetic. See ``WEIGHTS_ONLY_UNSAFE_GLOBALS`` for what weights_only=True refuses.
    """
    import_mmseg()
    import mmengine
    from mmengine.logging import MessageHub
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu
    from mmengine.utils import apply_to, get_git_hash

    cfg = model.peer_cfg
    cfg_text = cfg.pretty_text  # yapf-formatted; the Runner formats it for meta and message_hub alike
    path = Path(path)
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    experiment_name = f"{Path(cfg.filename).stem}_{stamp}"
    palette = ade20k_palette(len(classes)) if palette is None else [list(map(int, rgb)) for rgb in palette]
    dataset_meta = dict(classes=tuple(classes), palette=palette, label_map=None, reduce_zero_label=reduce_zero_label)
    gen = torch.Generator().manual_seed(seed)

    # Runner.__init__ + RuntimeInfoHook.before_run / before_train
    hub = MessageHub.get_instance(f"mmseg_peer_{experiment_name}_{id(model)}_{time.monotonic_ns()}")
    hub.update_info_dict(
        dict(
            cfg=cfg_text,
            seed=seed,
            experiment_name=experiment_name,
            mmengine_version=mmengine.__version__ + get_git_hash(),
        )
    )
    hub.update_info("loop_stage", "train")
    hub.update_info("epoch", 0)
    hub.update_info("iter", 0)
    hub.update_info("max_epochs", 1)  # IterBasedTrainLoop
    hub.update_info("max_iters", iters)
    hub.update_info("dataset_meta", dataset_meta)

    # the optimizer and schedulers as the Runner builds them, on a copy (synthetic steps);
    # without optimizer and scheduler state (a release's stripped checkpoint) they are skipped
    with_optim = save_optimizer or save_param_scheduler
    trained = copy.deepcopy(model).train() if with_optim else None
    optim_wrapper = build_optim_wrapper(trained, cfg.optim_wrapper) if with_optim else None  # logs grad_norm
    schedulers = [
        PARAM_SCHEDULERS.build(dict(sched_cfg), default_args=dict(optimizer=optim_wrapper))
        for sched_cfg in (cfg.param_scheduler if with_optim else [])
    ]
    if optim_wrapper is not None:
        optim_wrapper.message_hub = hub
    time_sec_tot = 0.0
    loss_names = _loss_log_names(model)
    for it in range(iters):
        hub.update_info("iter", it)  # RuntimeInfoHook.before_train_iter
        if optim_wrapper is not None:
            for name, lr in optim_wrapper.get_lr().items():
                hub.update_scalar(f"train/{name}", lr[0])
        hub.update_scalar("train/data_time", 0.01 + 0.01 * torch.rand((), generator=gen).item())  # IterTimerHook
        scale = 0.01 * (1.0 + torch.rand((), generator=gen).item())
        if optim_wrapper is not None:
            for param in trained.parameters():  # model.train_step: backward (synthetic gradients)
                param.grad = torch.full_like(param, scale)
            optim_wrapper.step()  # clips the gradients and logs train/grad_norm
            optim_wrapper.zero_grad()
        log_vars = {name: 1.0 + torch.rand((), generator=gen).item() for name in loss_names}
        total = sum(value for key, value in log_vars.items() if "loss" in key)
        for key, value in {"loss": total, **log_vars}.items():  # RuntimeInfoHook.after_train_iter
            hub.update_scalar(f"train/{key}", value)
        hub.update_scalar("train/time", 0.5 + 0.1 * torch.rand((), generator=gen).item())  # IterTimerHook
        time_sec_tot += hub.get_scalar("train/time").current()  # a numpy.float64, as in the hook
        hub.update_info("eta", time_sec_tot / (it + 1) * (iters - it - 1))
        for scheduler in schedulers:  # ParamSchedulerHook.after_train_iter
            scheduler.step()
    hub.update_info("last_ckpt", str(path))  # CheckpointHook._save_checkpoint_with_step

    # Runner.save_checkpoint(by_epoch=False)
    meta: dict[str, Any] = {}
    meta.setdefault("epoch", 0)
    meta.setdefault("iter", iters)
    meta.update(
        cfg=cfg_text,
        seed=seed,
        experiment_name=experiment_name,
        time=stamp,
        mmengine_version=mmengine.__version__ + get_git_hash(),
    )
    meta.update(dataset_meta=dataset_meta)
    checkpoint: dict[str, Any] = {
        "meta": meta,
        "state_dict": weights_to_cpu(model.state_dict()),
        "message_hub": apply_to(hub.state_dict(), lambda x: hasattr(x, "cpu"), lambda x: x.cpu()),
    }
    if save_optimizer and optim_wrapper is not None:
        checkpoint["optimizer"] = apply_to(optim_wrapper.state_dict(), lambda x: hasattr(x, "cpu"), lambda x: x.cpu())
    if save_param_scheduler:
        checkpoint["param_schedulers"] = [scheduler.state_dict() for scheduler in schedulers]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, str(path))
    return checkpoint


def init_mmseg_model(
    name: str,
    checkpoint: str | Path,
    test_scale: Sequence[int] | None = None,
    test_cfg: Mapping[str, Any] | None = None,
) -> nn.Module:
    """MMSegmentation's own ``mmseg.apis.init_model`` of config ``name`` and ``checkpoint`` on the
    CPU, with the config's data preprocessor and test pipeline: ``inference_model`` on it is the
    path a user of MMSegmentation takes (read, ``Resize`` keep-ratio, normalise, network, logits
    resized to the image). ``test_scale`` replaces the test ``Resize`` scale (``(2048, 512)``),
    ``test_cfg`` the model's (e.g. ``dict(mode="slide", crop_size=..., stride=...)``)."""
    import_mmseg()
    from mmseg.apis import init_model

    cfg = load_knet_config(name, keep_preprocessor=True)
    if test_scale is not None:
        resizes = [step for step in cfg.test_pipeline if step["type"] == "Resize"]
        assert len(resizes) == 1, cfg.test_pipeline
        resizes[0]["scale"] = tuple(int(v) for v in test_scale)
    if test_cfg is not None:
        cfg.model.test_cfg = dict(test_cfg)
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        return init_model(cfg, str(checkpoint), device="cpu")


def load_mmseg_checkpoint(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load ``path`` into ``model`` with mmengine's ``load_checkpoint`` (strict), inside
    ``torch.serialization.safe_globals(mmengine_safe_globals())`` so that it works with
    torch's weights_only=True default; returns the checkpoint."""
    import_mmseg()
    from mmengine.runner import load_checkpoint

    with torch.serialization.safe_globals(mmengine_safe_globals()):
        return load_checkpoint(model, str(path), map_location="cpu", strict=True)
