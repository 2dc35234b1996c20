"""Every command of the README's Quick start, and of "Use the published weights"
(docs/guides/published-weights.md), runs as written, from a fresh folder, as a new user types it:
only size-reducing overrides are appended (a tiny network, a few tiny images, one epoch) and the
placeholders are filled in (``<run>``, ``/data/coco``); never a ``hydra.run.dir`` /
``hydra.sweep.dir`` the page does not show."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from docs_blocks import blocks, commands, section
from PIL import Image

from knet_lightning.data.io import id2rgb

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m knet_lightning"
PUBLISHED_WEIGHTS = "docs/guides/published-weights.md"

# a tiny network and data set: size only, so the command keeps its meaning
TINY_NET = ["model.net.backbone_depth=18", "model.net.channels=32", "model.net.num_groups=8",
            "model.net.feedforward_channels=64", "model.net.num_heads=2"]  # fmt: skip
TINY_KERNELS = ["model.num_proposals=6", "model.num_stages=1"]
ONE_EPOCH = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
             "trainer.limit_test_batches=1", "data.num_workers=0", "data.persistent_workers=false"]  # fmt: skip
TINY_SYNTHETIC = ["data.num_train=8", "data.num_val=4", "data.image_size=64", "data.batch_size=4",
                  "data.val_batch_size=4"]  # fmt: skip
# the COCO experiment on its fixture; pretrained=false: no test downloads weights
TINY_COCO = ["data.train_short_edge=64", "data.train_max_size=96", "data.eval_short_edge=64",
             "data.eval_max_size=96", "data.val_batch_size=2", "model.net.pretrained=false"]  # fmt: skip

# What a run prints (issue 27): the run folder at the start and at the end, the progress bar, the
# validation results, the final table. A warning line (a Python warning, a logging WARNING) outside
# this list fails the default run's test; each entry says why it may appear under the test's
# size reductions, which a full default run does not print
ALLOWED_WARNINGS = {
    r"\[WARNING\] - no best checkpoint was saved; testing the last weights": (
        "one epoch ends before the default experiment's first validation (every 5th epoch), so "
        "no best checkpoint exists; the full run validates 12 times"
    ),
    r"fit_loop\.py:\d+: The number of training batches \(\d+\) is smaller than the logging interval": (
        "trainer.limit_train_batches=2 against log_every_n_steps=10; the default run's epochs have 38 batches"
    ),
}
# lines every run printed before and no user could act on: Lightning's LitLogger tip, its note on
# our model summary callback, the summary's FLOPs (0), W&B on the `anonymous` Lightning passed,
# the bar's logger version, Lightning's seed line, its step-count and TPU lines
NOISE = ("💡 Tip", "litlogger", "Trainer already configured", "Total FLOPs", "┃ FLOPs", "anonymous setting", "v_num",
         "Seed set to", "to estimate number of stepping batches", "TPU available")  # fmt: skip
WARNING_LINE = re.compile(r"\bWARNING\b|Warning\b|^\S.*\.py:\d+: ")


def unexpected_output(output: str, allowed: dict[str, str] | None = None) -> list[str]:
    """The lines of a run's ``output`` that it should not print: warning lines that ``allowed``
    (patterns) does not explain, and the known noise of :data:`NOISE`."""
    lines = output.splitlines()
    warned = [line for line in lines if WARNING_LINE.search(line)]
    bad = [line for line in warned if not any(re.search(p, line) for p in (allowed or {}))]
    return bad + [line for line in lines if any(n in line for n in NOISE)]


def quick_start_commands() -> list[str]:
    """The ``python -m knet_lightning`` lines of the README's Quick start block, comments dropped."""
    quick_start = blocks(section("README.md", "## Quick start"))
    assert quick_start, "README.md has no Quick start bash block"
    return commands(quick_start[0], COMMAND)


def _write_coco_panoptic(root: Path) -> None:
    """A COCO panoptic folder (annotations layout, train2017 + val2017) with COCO's 80 + 53
    categories and two 48x64 images per split."""
    rng = np.random.default_rng(0)
    categories = [{"id": c + 1, "name": f"class{c}", "isthing": int(c < 80), "supercategory": "x"} for c in range(133)]
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        png_dir = root / "annotations" / f"panoptic_{split}"
        png_dir.mkdir(parents=True)
        images, annotations = [], []
        for i in range(2):
            ids = np.full((48, 64), 7, dtype=np.uint32)  # stuff class 100
            ids[8:30, 10:40] = 3  # thing class 4
            ids[30:44, 40:60] = 5  # thing class 11
            name = f"{i:012d}"
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / split / f"{name}.jpg")
            Image.fromarray(id2rgb(ids)).save(png_dir / f"{name}.png")
            images.append({"id": i, "file_name": f"{name}.jpg", "height": 48, "width": 64})
            segments = [{"id": sid, "category_id": cat, "iscrowd": 0, "area": int((ids == sid).sum()),
                         "bbox": [0, 0, 1, 1]} for sid, cat in ((7, 100), (3, 4), (5, 11))]  # fmt: skip
            annotations.append({"image_id": i, "file_name": f"{name}.png", "segments_info": segments})
        payload = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(payload))


def _reductions(args: list[str]) -> list[str]:
    """The size-reducing overrides for one command (a sweep keeps the values it sweeps)."""
    sweep = "-m" in args or any(a.startswith("hparams_search=") for a in args)
    extra = TINY_NET + ([] if sweep else TINY_KERNELS) + ONE_EPOCH
    coco = any(a.startswith("experiment=knet_r50_coco") for a in args)
    return extra + (TINY_COCO if coco else TINY_SYNTHETIC)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("KNET_ROOT", "KNET_CONFIG_DIR")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "knet_lightning", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)  # fmt: skip


def test_every_quick_start_command_runs_as_written(tmp_path: Path) -> None:
    commands = quick_start_commands()
    assert len(commands) == 9, commands  # the test below knows what each one must leave behind
    cwd = tmp_path / "fresh clone"  # the user's working directory, with a space in its path
    cwd.mkdir()
    (cwd / "path" / "to" / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.png"):
        Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(cwd / "path" / "to" / "images" / name)
    coco_root = tmp_path / "coco"
    _write_coco_panoptic(coco_root)
    train_runs = cwd / "logs" / "train" / "runs"
    first_run: Path | None = None
    for command in commands:
        assert "hydra.sweep.dir" not in command
        if "<run>" in command:
            assert first_run is not None
            command = command.replace("<run>", first_run.name)
        command = command.replace("/data/coco", str(coco_root))
        assert "<" not in command, f"unknown placeholder in {command}"
        args = shlex.split(command)[len(COMMAND.split()) :]
        before = set(train_runs.glob("*")) if train_runs.is_dir() else set()
        proc = _run(args + _reductions(args), cwd)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        output = proc.stdout + proc.stderr
        if args == []:  # the default run: data generated here, a checkpoint and a result
            assert (cwd / "data" / "synthetic").is_dir()
            (first_run,) = set(train_runs.glob("*")) - before
            assert (first_run / "checkpoints" / "last.ckpt").is_file() and (first_run / "metrics.json").is_file()
            # what a user needs and nothing else: the run folder first and last, the bar, the table
            assert not unexpected_output(output, ALLOWED_WARNINGS), unexpected_output(output, ALLOWED_WARNINGS)
            assert output.count(f"run folder: {first_run}") == 2
            assert "Epoch 0/0" in proc.stdout and "K-Net panoptic (train)" in proc.stdout
            assert "Test metric" not in output  # Lightning's own table of the same test metrics
        else:  # the others without the noise every run printed, whatever else their setting warns of
            noise = [line for line in output.splitlines() if any(n in line for n in NOISE)]
            assert not noise, f"{command}: {noise}"
        if "mode=eval" in args:
            # no best checkpoint is tracked by an evaluation: it writes none
            assert "tracked anew" not in output and not list((cwd / "logs" / "eval").glob("runs/*/checkpoints"))
        if "export_predictions=true" in args or "mode=predict" in args:
            (run,) = [
                p
                for p in (cwd / "logs").glob("*/runs/*")
                if (p / "predictions").is_dir()
                and p.stat().st_mtime >= max(q.stat().st_mtime for q in (cwd / "logs").glob("*/runs/*")) - 1e-3
            ]
            assert (run / "predictions" / "panoptic.json").is_file()
        if "mode=predict" in args:
            pngs = sorted(p.name for p in (cwd / "logs").glob("predict/runs/*/predictions/panoptic/*.png"))
            assert pngs == ["a.png", "b.png"]
        if "-m" in args or any(a.startswith("hparams_search=") for a in args):
            sweeps = sorted((cwd / "logs" / "train" / "multiruns").glob("*"))
            with (sweeps[-1] / "summary.csv").open() as fh:
                rows = list(csv.DictReader(fh))
            assert len(rows) == 12 and {r["status"] for r in rows} == {"done"}
            assert {(r["N"], r["S"]) for r in rows} == {(n, s) for n in ("50", "100", "200") for s in "1234"}
        if any(a.startswith("experiment=knet_r50_coco") for a in args):
            assert list(cwd.glob("logs/train/runs/*/wandb/offline-run-*")), "no offline W&B run"
            # warnings nobody can act on: pinning without a GPU, the frozen backbone's eval-mode
            # modules (logged as by design instead), Lightning's use of torch's pytree API
            for noise in ("'pin_memory' argument", "module(s) in eval mode at the start", "LeafSpec"):
                assert noise not in proc.stderr + proc.stdout, noise
        if "ckpt_path=last" in args and "mode=train" not in args and not any(a.startswith("mode=") for a in args):
            # the resume commands restore the default run's own checkpoint (not the COCO run's,
            # newer) and say which one
            assert f"ckpt_path=last: {first_run / 'checkpoints' / 'last.ckpt'}" in proc.stdout + proc.stderr


def published_weights_commands() -> list[str]:
    """The commands of the first bash block of "Use the published weights", continuation lines joined."""
    page = blocks(section(PUBLISHED_WEIGHTS, "# Use the published weights"))
    assert page, f"{PUBLISHED_WEIGHTS} has no bash block"
    return commands(page[0], COMMAND)


def test_published_weights_commands_run_as_written(tmp_path: Path) -> None:
    """Convert, evaluate, predict and fine-tune as the published-weights page shows, with the
    official release's file written in its format (MMDetection 2.x: meta + state_dict, the official
    key layout of tests/data/knet_official/) under its published name. The network is the
    experiment's R50: only the data (tiny images) and the schedule (a few batches) are reduced."""
    import torch
    from test_convert_mmdet import official_keys, random_official

    commands = published_weights_commands()
    assert len(commands) == 4 and "mode=convert" in commands[0], commands
    cwd = tmp_path / "fresh clone"
    (cwd / "path" / "to" / "images").mkdir(parents=True)
    Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(cwd / "path" / "to" / "images" / "a.jpg")
    coco_root = tmp_path / "coco"
    _write_coco_panoptic(coco_root)
    source = re.search(r"convert_source=(\S+)", commands[0]).group(1)
    meta = {"mmdet_version": "2.17.0", "CLASSES": [f"class{c}" for c in range(133)], "epoch": 12}
    torch.save({"meta": meta, "state_dict": random_official(official_keys("panoptic_r50"))}, cwd / source)
    data = [a for a in TINY_COCO if not a.startswith("model.")]
    for command in commands:
        args = shlex.split(command.replace("/data/coco", str(coco_root)))[len(COMMAND.split()) :]
        proc = _run(args + data + ONE_EPOCH, cwd)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        assert "Downloading" not in proc.stderr + proc.stdout  # the weights come from the file, never a download
        if "mode=convert" in args:
            # the run folder, the conversion and where the file is: no warning, no seed line, and
            # no empty data/ in the working folder (data.root is elsewhere)
            assert not unexpected_output(proc.stdout + proc.stderr), proc.stdout + proc.stderr
            assert not (cwd / "data").exists()
    assert (cwd / "knet_panoptic.ckpt").is_file()
    assert sorted(p.name for p in cwd.glob("logs/predict/runs/*/predictions/panoptic/*.png")) == ["a.png"]
    assert list(cwd.glob("logs/eval/runs/*/metrics.json")) and list(cwd.glob("logs/train/runs/*/metrics.json"))
