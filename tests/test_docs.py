"""The documentation: the site builds with ``mkdocs build --strict`` (no broken link or anchor, no
page outside the nav), the README stays short, and every command the README and the pages show in
a code block is one that a test runs as written (or is listed below with the reason it cannot be)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from docs_blocks import ROOT, blocks, commands, pages, read

README_MAX_LINES = 300
# a line of a shell block that runs the package or a make target
RUNS_SOMETHING = re.compile(r"(^|\s)(python -m knet_lightning|knet-lightning)(\s|$)|^make\s")

# Commands shown but run by no test as written, each with the reason. A pattern that matches
# nothing fails the test (the list cannot outlive the commands it excuses).
NOT_RUN: dict[str, str] = {
    r"^python -m knet_lightning experiment=knet_\S+ +trainer=(ddp|multinode)\b.* data\.root=/data/\S+ +logger=wandb$": (
        "Experiments: the paper's full-scale trainings need a GPU node (trainer=ddp / multinode) and the "
        "real data set; tests/test_experiments.py trains and evaluates every experiment on tiny copies"
    ),
    r"^python -m knet_lightning mode=eval experiment=knet_r50_coco_panoptic_1x trainer=gpu ": (
        "Experiments: evaluation on a GPU (trainer=gpu) of a full-scale run's checkpoint; "
        "the Quick start's mode=eval export_predictions=true is run on the CPU by tests/test_readme.py"
    ),
    r"^make (train|test)\b": (
        "README: `make test` is what CI runs (.ci/run); `make train` is `python -m knet_lightning`, the "
        "8-minute default run, which tests/test_readme.py runs size-reduced as the Quick start's first command"
    ),
}


def _nav_pages(nav: list) -> list[str]:
    found = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found += _nav_pages(value) if isinstance(value, list) else [value]
    return found


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict`` as ``make docs`` runs it: a broken link or anchor, a page outside
    the nav or a nav entry without its page is an error."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert "WARNING" not in proc.stderr, proc.stderr


def test_the_readme_is_short_and_links_to_pages_that_exist() -> None:
    readme = read("README.md")
    assert len(readme.splitlines()) <= README_MAX_LINES, len(readme.splitlines())
    links = re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)(?:#[^)]*)?\)", readme)
    assert links, "README.md links to no documentation page"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page() -> None:
    config = yaml.safe_load(read("mkdocs.yml"))
    assert config["theme"]["name"] == "material"
    nav = _nav_pages(config["nav"])
    docs = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == docs
    assert len(nav) == len(set(nav)), nav


def documented_commands() -> dict[str, list[str]]:
    """Every command that runs the package or a make target in a bash block, by page."""
    found: dict[str, list[str]] = {}
    for page in pages():
        for block in blocks(read(page)):
            found.setdefault(page, []).extend(c for c in commands(block) if RUNS_SOMETHING.search(c))
    return found


def commands_the_tests_run() -> set[str]:
    """The commands the tests read from the pages and run, each read by the test's own function."""
    import test_own_data
    import test_readme
    import test_reference_pipeline
    import test_segmenter
    import test_serve
    import test_slurm_cluster
    import test_wheel

    tested = set(test_readme.quick_start_commands()) | set(test_readme.published_weights_commands())
    tested |= {c for cs in test_own_data.own_data_commands().values() for c in cs}
    tested.add(test_reference_pipeline.multi_scale_flip_command())
    tested |= set(test_segmenter.use_a_trained_model_commands())
    tested |= set(test_serve.serve_page_commands())
    tested |= set(test_slurm_cluster.slurm_commands())
    tested |= set(commands(test_slurm_cluster.sbatch_example()))  # the script the sbatch command submits
    tested |= set(test_wheel._readme_install_block())
    return {" ".join(c.split()) for c in tested}


def test_every_documented_command_is_run_by_a_test() -> None:
    tested = commands_the_tests_run()
    untested = {}
    excused = {pattern: [] for pattern in NOT_RUN}
    for page, shown in documented_commands().items():
        for command in shown:
            if command in tested:
                continue
            reasons = [p for p in NOT_RUN if re.search(p, command)]
            for pattern in reasons:
                excused[pattern].append(command)
            if not reasons:
                untested.setdefault(page, []).append(command)
    assert not untested, f"commands no test runs (add them to a test, or to NOT_RUN with the reason): {untested}"
    assert all(excused.values()), f"NOT_RUN entries that match no command: {[p for p, c in excused.items() if not c]}"


def test_every_python_example_is_run_by_a_test() -> None:
    """The Python blocks: the ``Segmenter`` example of "Use a trained model" is the only one
    (tests/test_segmenter.py and tests/test_wheel.py run it)."""
    import test_segmenter

    shown = [(page, block) for page in pages() for block in blocks(read(page), "python")]
    assert [block for _, block in shown] == [test_segmenter.python_example()], [page for page, _ in shown]
