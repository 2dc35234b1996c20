"""Exact resume: a run killed with SIGKILL (or stopped by SIGTERM) at some step and resumed with
``ckpt_path=last`` ends with exactly the weights, optimizer state and metrics of the same run
uninterrupted.

The interrupted runs are subprocesses (this file run as a script): SIGKILL ends the process, and
the SIGTERM comes from outside as a scheduler's would. The uninterrupted and the resumed runs run
in this process (no second torch import: the suite stays fast), with the process-wide settings
that ``trainer.deterministic`` changes put back afterwards. The run: tiny K-Net with dropout
(so the RNG restore matters), 8 synthetic 64 px images, batch 2, flip augmentation, 2 epochs = 8
steps, a step checkpoint every 3 steps and one at every epoch end (steps 3, 4, 6, 8), validation
at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
EVERY = 3
TOTAL_STEPS = 8


def child_overrides(*extra: str) -> list[str]:
    from cli_utils import tiny_overrides

    return tiny_overrides(
        "data.batch_size=2",
        "data.flip_prob=0.5",
        "model.net.dropout=0.1",
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "trainer.limit_val_batches=1",
        "trainer.check_val_every_n_epoch=2",
        "test_after_fit=false",
        f"callbacks.step_checkpoint.every_n_train_steps={EVERY}",
        "~callbacks.progress_bar",
        "~callbacks.prediction_overlays",
        *extra,
    )


def child_main(workdir: str, action: str, at_step: int, resume: bool, extra: list[str]) -> None:
    """Runs the app in this process: ``action`` is ``none``, ``kill`` (SIGKILL itself after
    ``at_step``) or ``wait`` (after ``at_step`` write ``<workdir>/at_step`` and sleep, so that
    the test's SIGTERM lands between two steps)."""
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    from cli_utils import compose_cfg, run_cfg
    from lightning.pytorch import Callback

    import knet_lightning.cli as cli

    class Interrupt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step != at_step:
                return
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "wait":
                (Path(workdir) / "at_step").write_text(str(at_step))
                deadline = time.monotonic() + 60
                # the test sends SIGTERM meanwhile (a handler does not cut a sleep short: poll)
                while not trainer.received_sigterm and time.monotonic() < deadline:
                    time.sleep(0.05)

    cfg = compose_cfg(Path(workdir), child_overrides(*extra, *(["ckpt_path=last"] if resume else [])))
    original = cli.build_callbacks
    cli.build_callbacks = lambda c: original(c) + ([Interrupt()] if action != "none" and not resume else [])
    run_cfg(cfg)


def _spawn(
    workdir: Path, action: str = "none", at_step: int = 0, resume: bool = False, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    env = dict(os.environ, KNET_TEST_THREADS="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, str(Path(__file__).resolve()), str(workdir), action, str(at_step), str(int(resume)), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _run_here(workdir: Path, resume: bool = False, extra: tuple[str, ...] = ()) -> None:
    """One run in this process; the settings ``deterministic=True`` changes are restored."""
    from cli_utils import compose_cfg, run_cfg

    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    threads = torch.get_num_threads()
    # the children compute with 1 thread; another thread count sums in another order, and other
    # tests of the suite leave their own count behind
    torch.set_num_threads(1)
    try:
        run_cfg(compose_cfg(workdir, child_overrides(*extra, *(["ckpt_path=last"] if resume else []))))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


def _final_state(workdir: Path) -> dict:
    from knet_lightning.checkpoint.io import load_checkpoint_file

    return load_checkpoint_file(workdir / "run" / "checkpoints" / "last.ckpt")


def _assert_same_run(resumed: Path, baseline: Path) -> None:
    from cli_utils import assert_same_run

    assert_same_run(resumed / "run", baseline / "run", TOTAL_STEPS)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run_here(workdir)
    return workdir


def test_sigkill_then_resume_from_last_matches_the_uninterrupted_run(tmp_path: Path, baseline: Path) -> None:
    # killed after step 7 (epoch 1): last.ckpt is the step-6 checkpoint, mid-epoch 1, so the
    # resumed run must take up the epoch at its 3rd batch
    code, out = _finish(_spawn(tmp_path, "kill", at_step=7))
    assert code == -signal.SIGKILL, out[-4000:]
    state = _final_state(tmp_path)
    assert state["global_step"] == 2 * EVERY
    assert not (tmp_path / "run" / "metrics.json").exists()

    _run_here(tmp_path, resume=True)
    _assert_same_run(tmp_path, baseline)


def test_a_run_killed_between_validations_loses_at_most_the_epoch_it_was_in(tmp_path: Path, baseline: Path) -> None:
    """last.ckpt is rewritten at every training epoch end, also where no validation ran (here
    every 2nd epoch, the default experiment's every 5th) and no step checkpoint fell: a run
    killed during epoch 1 resumes from epoch 0's end, and the documented resume command, run as a
    user types it, finishes the same run."""
    code, out = _finish(_spawn(tmp_path, "kill", at_step=5))  # the 1st step of epoch 1
    assert code == -signal.SIGKILL, out[-4000:]
    state = _final_state(tmp_path)
    # epoch 0 ended at step 4 (steps 3 and 4 were saved): one step of work lost, not an epoch
    assert (state["epoch"], state["global_step"]) == (0, 4)
    assert not any(k.startswith("val/") for k in state["callbacks"].get("metrics", {}))  # no validation yet
    assert not list((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))

    run_dir = tmp_path / "run"
    env = dict(os.environ, KNET_ROOT=str(tmp_path), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    command = [sys.executable, "-m", "knet_lightning", *child_overrides(), "ckpt_path=last", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"ckpt_path=last: {run_dir / 'checkpoints' / 'last.ckpt'} (this run folder)" in proc.stdout + proc.stderr
    assert _final_state(tmp_path)["epoch"] == _final_state(baseline)["epoch"] == 1
    _assert_same_run(tmp_path, baseline)


def test_sigterm_saves_at_the_step_boundary_and_the_resumed_run_matches(tmp_path: Path, baseline: Path) -> None:
    proc = _spawn(tmp_path, "wait", at_step=2)
    deadline = time.monotonic() + 240
    while not (tmp_path / "at_step").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the child never reached step 2:\n{_finish(proc)[1][-4000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 128 + signal.SIGTERM, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    state = _final_state(tmp_path)
    assert state["global_step"] == 2  # not the step-3 checkpoint: that step never ran
    assert "resume with ckpt_path=last" in out

    _run_here(tmp_path, resume=True)
    _assert_same_run(tmp_path, baseline)


@pytest.mark.slow
def test_sigkill_resume_is_exact_with_persistent_loader_workers(tmp_path: Path) -> None:
    # the synthetic default's loader: one persistent worker process (augmentations run there)
    extra = ("data.num_workers=1", "data.persistent_workers=true")
    _run_here(tmp_path / "baseline", extra=extra)
    (tmp_path / "killed").mkdir()
    code, out = _finish(_spawn(tmp_path / "killed", "kill", at_step=5, extra=extra))
    assert code == -signal.SIGKILL, out[-4000:]
    _run_here(tmp_path / "killed", resume=True, extra=extra)
    _assert_same_run(tmp_path / "killed", tmp_path / "baseline")


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])), sys.argv[5:])
