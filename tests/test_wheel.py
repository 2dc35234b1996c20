"""What a user installs is the wheel: built with the sdist as ``python -m build`` builds them,
checked with ``twine check``, installed into a fresh virtual environment outside the checkout and
run from an empty folder as the README's first hour does.

CI installs the wheel with ``--no-deps`` and lends it the build environment's copies of exactly
the distributions the wheel's metadata requires (the transitive closure of its ``Requires-Dist``,
linked into one folder): a dependency the metadata forgets is missing there, as it would be in a
user's environment, and ``pip check`` holds, without downloading 6 GB of torch and CUDA wheels in
every CI run. ``make test-all`` also installs the wheel with its dependencies from the index.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from cli_utils import tiny_overrides
from docs_blocks import blocks, commands, section
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
USE_A_TRAINED_MODEL = "docs/guides/use-a-trained-model.md"
# only size: the first hour's commands with a tiny network and data set (the CLI's own overrides)
TINY = tiny_overrides()


def _user_env(venv_dir: Path) -> dict[str, str]:
    """A user's shell with the fresh environment activated: nothing points at the checkout."""
    drop = ("KNET_ROOT", "KNET_CONFIG_DIR", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv_dir)
    env["WANDB_MODE"] = "offline"
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _requirement_closure(name: str, extras: tuple[str, ...] = ()) -> list[metadata.Distribution]:
    """The installed distributions ``name`` with its ``extras`` needs, transitively (markers
    evaluated; the dependencies' own extras are not followed)."""

    def needed(requirements: list[str], extra_names: tuple[str, ...]) -> list[Requirement]:
        reqs = [Requirement(r) for r in requirements]
        return [r for r in reqs if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *extra_names))]

    seen: dict[str, metadata.Distribution] = {}
    todo = needed(metadata.requires(name) or [], extras)
    while todo:
        req = todo.pop()
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        dist = metadata.distribution(req.name)
        seen[key] = dist
        todo += needed(dist.requires or [], ())
    return list(seen.values())


def _link_dependencies(into: Path) -> None:
    """Links the top-level files and folders of every distribution knet-lightning requires (as
    installed in this environment) into ``into``."""
    into.mkdir()
    # a user of mode=serve installs knet-lightning[serve]: every module of the wheel imports then
    for dist in _requirement_closure("knet-lightning", extras=("serve",)):
        site = Path(str(dist.locate_file("")))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (into / top).exists() and (site / top).exists():
                (into / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, the wheel built from the sdist (``python -m build``)."""
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], cwd=dist, env=dict(os.environ))
    return dist


@pytest.fixture(scope="module")
def installed(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment outside the checkout with the wheel installed."""
    home = tmp_path_factory.mktemp("user")
    env_dir = home / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    (wheel,) = built.glob("knet_lightning-*.whl")
    py = env_dir / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], home, _user_env(env_dir))
    # venv's own setuptools (ensurepip's, older than torch requires) would shadow the lent one
    _run([str(py), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], home, _user_env(env_dir))
    deps = home / "deps"
    _link_dependencies(deps)
    (site,) = env_dir.glob("lib/python*/site-packages")
    (site / "knet_lightning_test_deps.pth").write_text(f"{deps}\n")
    return env_dir


def test_sdist_and_wheel_pass_twine_check_and_hold_every_package(built: Path) -> None:
    _run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, sorted(built.iterdir()))],
        built,
        dict(os.environ),
    )
    (wheel,) = built.glob("knet_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    src = ROOT / "src"
    packages = sorted(p.parent.relative_to(src).as_posix() for p in src.rglob("__init__.py"))
    assert "knet_lightning/tasks" in packages and "knet_lightning/checkpoint/convert" in packages
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel: {missing}"
    modules = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py"))
    assert [m for m in modules if m not in names] == []
    configs = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert "train.yaml" in configs and "experiment/knet_r50_coco_panoptic_1x.yaml" in configs
    assert [c for c in configs if f"knet_lightning/conf/{c}" not in names] == []
    sdist = next(built.glob("knet_lightning-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = {Path(m).relative_to(Path(m).parts[0]).as_posix() for m in tar.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "src/knet_lightning/conf/train.yaml"} <= members


def test_the_installed_wheel_imports_every_module_and_satisfies_its_requirements(installed: Path) -> None:
    py, home = str(installed / "bin" / "python"), installed.parent
    env = _user_env(installed)
    _run([str(installed / "bin" / "pip"), "check"], home, env)
    code = (
        "import importlib, pkgutil, knet_lightning\n"
        "print(knet_lightning.__file__)\n"
        "mods = [m.name for m in pkgutil.walk_packages(knet_lightning.__path__, 'knet_lightning.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        "print(len(mods), 'modules')\n"
    )
    out = _run([py, "-c", code], home, env).stdout
    assert out.splitlines()[0].startswith(str(installed)), out  # the wheel's copy, not the checkout
    assert int(out.splitlines()[1].split()[0]) > 50


def _readme_install_block() -> list[str]:
    """The README's "Install the package" commands, comments dropped."""
    install = blocks(section("README.md", "### Install the package"))
    assert install, "README.md has no 'Install the package' bash block"
    return commands(install[0])


def test_first_hour_from_the_wheel_in_an_empty_folder(installed: Path, built: Path) -> None:
    """The README's install commands with the wheel this test installed (``knet-lightning --help``,
    ``knet-lightning debug=fast_dev_run``: the embedded data set generated by the installed
    package), then a short training run and the ``Segmenter`` example of "Use a trained model"
    (docs/guides/use-a-trained-model.md) on its checkpoint,
    each from an empty folder."""
    lines = _readme_install_block()
    (wheel,) = built.glob("knet_lightning-*.whl")
    assert f"pip install dist/{wheel.name}" in lines and "python -m build" in lines
    commands = [line.split() for line in lines if line.startswith("knet-lightning")]
    assert [c[:2] for c in commands] == [["knet-lightning", "--help"], ["knet-lightning", "debug=fast_dev_run"]]
    env = _user_env(installed)
    work = installed.parent / "work"
    work.mkdir()
    out = _run(commands[0], work, env).stdout
    assert out.startswith("knet-lightning: K-Net") and "mode=train|eval|predict" in out and "experiment:" in out

    _run([*commands[1], *TINY], work, env)  # only size-reducing overrides appended
    assert (work / "data" / "synthetic" / "annotations").is_dir()
    assert list((work / "logs" / "debug" / "runs").iterdir())

    _run(["knet-lightning", "debug=limit", *TINY], work, env)
    (ckpt,) = work.glob("logs/train/runs/*/checkpoints/last.ckpt")
    code = blocks(section(USE_A_TRAINED_MODEL, "# Use a trained model"), "python")[0]
    notebook = installed.parent / "notebook"
    notebook.mkdir()
    (notebook / "last.ckpt").symlink_to(ckpt)
    photo = sorted((work / "data" / "synthetic" / "val2017").glob("*.jpg"))[0]
    (notebook / "photo.jpg").symlink_to(photo)
    out = _run([str(installed / "bin" / "python"), "-c", code], notebook, env).stdout
    assert "torch.Size([" in out
    assert (notebook / "overlay.png").stat().st_size > 0 and (notebook / "photo.png").stat().st_size > 0


@pytest.mark.slow
def test_the_wheel_installs_with_its_dependencies_from_the_index(built: Path, tmp_path: Path) -> None:
    """A plain ``pip install knet_lightning-*.whl`` into a fresh environment: every dependency
    resolves from the package index (about 6 GB with torch's CUDA libraries; not in CI)."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    (wheel,) = built.glob("knet_lightning-*.whl")
    env = _user_env(env_dir)
    _run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], tmp_path, env, timeout=1800)
    _run([str(env_dir / "bin" / "pip"), "check"], tmp_path, env)
    out = _run([str(env_dir / "bin" / "knet-lightning"), "--help"], tmp_path, env).stdout
    assert "mode" in out
