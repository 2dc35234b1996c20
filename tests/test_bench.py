"""Smoke test of scripts/bench.py: the ``--tiny`` run end to end, and the helpers of its
``knet_bench`` package.

Times are never asserted; only the structure of the JSON / Markdown and facts that hold by
construction (the hooked parts fire and fit inside the total, FLOPs grow with N and S).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"
# the benchmark package sits next to the script, outside the installed package
sys.path.insert(0, str(ROOT / "scripts"))

from knet_bench import cli, common, report, timing  # noqa: E402
from knet_bench import data as bench_data  # noqa: E402
from knet_bench import knet as bench_knet  # noqa: E402


def _has(module: str, attr: str | None = None) -> bool:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return attr is None or hasattr(mod, attr)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One ``--tiny`` run of the script as a user runs it (fresh process, all sections)."""
    out = tmp_path_factory.mktemp("bench") / "nested" / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"bench.py --tiny failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_tiny_run_header_and_machine(tiny_run: tuple[dict[str, Any], str]) -> None:
    data, stdout = tiny_run
    assert data["schema"] == cli.SCHEMA_VERSION
    assert data["mode"] == "tiny"
    assert data["argv"][:1] == ["--tiny"]
    assert data["profile"]["depth"] == 18 and data["profile"]["num_proposals"] == 10
    machine = data["machine"]
    assert machine["cpu_model"]
    assert machine["torch_threads"] == 1
    assert machine["device"] == "cpu"
    assert machine["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert list(data["sections"]) == list(cli.SECTIONS)
    for name in cli.SECTIONS:
        assert f"## {name}" in stdout
        section = data["sections"][name]
        assert section["status"] in ("ok", "skipped"), (name, section.get("reason"))
        assert section["seconds"] >= 0.0
    assert "JSON written to" in stdout


def test_tiny_run_knet_section(tiny_run: tuple[dict[str, Any], str]) -> None:
    data, stdout = tiny_run
    knet = data["sections"]["knet"]
    assert knet["status"] == "ok"
    assert knet["model"]["num_classes"] == 133 and knet["model"]["num_stages"] == 1
    assert 0 < knet["model"]["trainable_params"] < knet["model"]["params"]  # the stem is frozen
    rows = knet["rows"]
    assert [(r["size"], r["batch"], r["mode"]) for r in rows] == [
        ("64x64", 1, "inference"),
        ("64x64", 1, "train"),
        ("64x64", 2, "inference"),
        ("64x64", 2, "train"),
    ]
    for row in rows:
        order = common.INFER_PARTS if row["mode"] == "inference" else common.TRAIN_PARTS
        parts = row["parts_ms"]
        assert list(parts) == list(order)
        assert row["total_ms"] > 0 and len(row["runs_ms"]) == 1
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["total_ms"] / 1e3))
        # every hook / timer fired...
        for name in order:
            if name not in ("other", "losses"):
                assert parts[name] > 0, (row["mode"], name)
        # ...and the parts of one run lie inside that run's total
        assert parts["other"] >= -1e-6
        assert sum(parts.values()) == pytest.approx(row["breakdown_total_ms"])
        assert row["breakdown_total_ms"] == row["total_ms"]
        assert row["peak_mb"] > 0 and row["mem_kind"] in ("rss_peak", "rss_peak_process_lifetime")
    assert "| size | batch | mode | median ms |" in stdout
    assert "| size | batch | total | backbone | fpn_neck | kernel_head | update_stages | matching |" in stdout
    merges = knet["postprocess"]
    assert [(r["outputs"], r["method"]) for r in merges] == [
        ("random-weight model", "dense"),
        ("random-weight model", "sparse"),
        ("confident (trained-like)", "dense"),
        ("confident (trained-like)", "sparse"),
    ]
    assert all(r["ms"] > 0 and r["size"] == "64x64" for r in merges)
    assert "Panoptic post-processing of one image by merge method" in stdout


def test_confident_outputs_follow_the_ground_truth() -> None:
    from knet_lightning.postprocess.merge import panoptic_inference

    seg, labels = common.make_scene(np.random.default_rng(0), 128, 160, 5, 3)
    target = common.scene_target(seg, labels, torch.device("cpu"))
    mask_logits, cls_logits = bench_knet.confident_outputs(target, 20, torch.Generator().manual_seed(0))
    assert mask_logits.shape == (20 + common.NUM_STUFF, 32, 40) and cls_logits.shape == (20 + common.NUM_STUFF, 133)
    pan, segs = panoptic_inference(mask_logits, cls_logits, common.NUM_THINGS, 20, (128, 160), (128, 160), (128, 160))
    # the merge recovers every segment with its class (the duplicates score 0.05 and lose)
    assert sorted(s["category_id"] for s in segs) == sorted(labels.tolist())
    assert all(s["score"] == pytest.approx(0.9, abs=0.01) for s in segs)


def test_tiny_run_scaling_section(tiny_run: tuple[dict[str, Any], str]) -> None:
    data, _ = tiny_run
    scaling = data["sections"]["scaling"]
    assert scaling["status"] == "ok"
    rows = scaling["rows"]
    assert [(r["num_proposals"], r["num_stages"]) for r in rows] == [(10, 1), (20, 2)]
    small, big = rows
    # one more update stage and more proposals: strictly more weights and more work
    assert big["params_m"] > small["params_m"] > 0
    assert big["gflops"] > small["gflops"] > 0
    assert small["infer_ms"] > 0 and big["infer_ms"] > 0
    assert small["train_ms"] > 0 and big["train_ms"] is None  # only (10, 1) is in grid_train


def test_tiny_run_eval_and_data_sections(tiny_run: tuple[dict[str, Any], str]) -> None:
    data, stdout = tiny_run
    rows = data["sections"]["eval"]["rows"]
    metrics = [r["metric"] for r in rows]
    assert metrics[:2] == ["PanopticQuality", "MeanIoU (incl. panoptic_to_semantic)"]
    if _has("knet_lightning.evaluation.instance", "MaskAP"):
        assert metrics[2].startswith("MaskAP")
    else:
        assert any("MaskAP skipped" in n for n in data["sections"]["eval"]["notes"])
    for row in rows:
        assert row["images"] == 8 and row["images_per_s"] > 0

    rows = data["sections"]["data"]["rows"]
    assert [r["pipeline"] for r in rows] == ["decode (reader only)", "decode + train transforms"]
    for row in rows:
        assert row["samples"] == 3 and row["median_ms"] > 0 and row["samples_per_s_per_worker"] > 0
    assert "| pipeline | samples | median ms |" in stdout


def test_tiny_run_mask2former_section(tiny_run: tuple[dict[str, Any], str]) -> None:
    data, stdout = tiny_run
    m2f = data["sections"]["mask2former"]
    if importlib.util.find_spec("transformers") is None:
        assert m2f["status"] == "skipped" and "transformers" in m2f["reason"]
        assert "**skipped**" in stdout
        return
    assert m2f["status"] == "ok"
    knet = {(r["size"], r["batch"], r["mode"]): r["total_ms"] for r in data["sections"]["knet"]["rows"]}
    assert len(m2f["rows"]) == len(knet)
    for row in m2f["rows"]:
        assert row["m2f_ms"] > 0
        assert row["knet_ms"] == knet[(row["size"], row["batch"], row["mode"])]
        assert row["ratio_knet_over_m2f"] == pytest.approx(row["knet_ms"] / row["m2f_ms"])
    assert "| K-Net / M2F |" in stdout


def test_tiny_run_zoo_section(tiny_run: tuple[dict[str, Any], str]) -> None:
    """The large-model section: K-Net with a DCN and a Swin backbone (tiny stand-ins), and
    Mask2Former Swin where transformers is installed."""
    data, stdout = tiny_run
    zoo = data["sections"]["zoo"]
    assert zoo["status"] == "ok"
    rows = {r["model"]: r for r in zoo["rows"]}
    assert {"K-Net R50-DCN (1/4 width)", "K-Net Swin-T"} <= set(rows)
    limits = zoo["limits"]
    assert limits["matmul_fp32"] > 0 and limits["matmul_bf16"] > 0 and limits["conv_fp32"] > 0
    for name in ("K-Net R50-DCN (1/4 width)", "K-Net Swin-T"):
        row = rows[name]
        assert row["size"] == "64x64" and row["params_m"] > 0 and row["gflops"] > 0
        assert row["infer_ms"] > 0 and row["train_ms"] > 0
        # the forward is the inference less its post-processing; the rates follow from it
        assert 0 < row["forward_ms"] < row["infer_ms"]
        assert row["gflops_per_s"] == pytest.approx(row["gflops"] / (row["forward_ms"] / 1e3))
        assert row["fraction_of_matmul"] == pytest.approx(row["gflops_per_s"] / limits["matmul_fp32"])
    assert "| GFLOP/s | of matmul |" in stdout
    assert f"fp32 {limits['matmul_fp32']:.0f} GFLOP/s" in stdout
    # Swin-T's 28 M parameters dwarf the quarter-width ResNet's
    assert rows["K-Net Swin-T"]["params_m"] > rows["K-Net R50-DCN (1/4 width)"]["params_m"]
    has_m2f = importlib.util.find_spec("transformers") is not None
    assert any(name.startswith("Mask2Former") for name in rows) == has_m2f
    if has_m2f:
        m2f = rows["Mask2Former Swin (HF, tiny)"]
        assert 0 < m2f["forward_ms"] < m2f["infer_ms"] and m2f["fraction_of_matmul"] > 0
        ratio = rows["K-Net Swin-T"]["infer_ms"] / m2f["infer_ms"]
        assert f"K-Net Swin-T / Mask2Former at 64x64: inference {ratio:.2f}x" in stdout
    assert "| K-Net Swin-T | 64x64 |" in stdout


# ---------------------------------------------------------------------------- helpers


def test_markdown_table() -> None:
    rows = [{"a": "x", "b": 1234.5, "c": None}, {"a": "y", "b": 0.123, "c": 12.34}]
    assert report.markdown_table(rows, [("a", "A"), ("b", "B"), ("c", "C")]) == (
        "| A | B | C |\n|---|---|---|\n| x | 1234 | - |\n| y | 0.12 | 12.3 |"
    )


def test_breakdown_splits_criterion_and_closes_the_sum() -> None:
    result = {
        "total_ms": 90.0,
        "parts_total_ms": 100.0,
        "parts_ms": {"backbone": 40.0, "criterion": 25.0, "matching": 10.0, "backward": 20.0},
    }
    parts = timing.breakdown(result, common.TRAIN_PARTS)
    assert list(parts) == list(common.TRAIN_PARTS)
    assert parts["losses"] == 15.0 and parts["matching"] == 10.0
    assert parts["kernel_head"] == 0.0  # a part that did not run is 0, not missing
    assert parts["other"] == pytest.approx(100.0 - 40.0 - 25.0 - 20.0)


def test_round_robin_interleaves_the_steps_and_drops_the_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """One run of each step per round, round 0 untimed: a slow spell of the host (round 2 runs 3x
    slower) hits both steps alike, and the medians keep their 1 : 2 ratio."""
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    calls: list[str] = []
    slowdown = [10.0, 1.0, 3.0, 1.0]  # per round; round 0 is the warm-up

    def step(name: str, ms: float) -> tuple[str, Any]:
        def run() -> None:
            now[0] += ms * 1e-3 * slowdown[calls.count(name)]
            calls.append(name)

        return name, run

    result = timing.round_robin([step("a", 1.0), step("b", 2.0)], torch.device("cpu"), repeats=3)
    assert calls == ["a", "b"] * 4
    assert result["a"]["runs_ms"] == pytest.approx([1.0, 3.0, 1.0])
    assert result["b"]["runs_ms"] == pytest.approx([2.0, 6.0, 2.0])
    assert result["a"]["total_ms"] == pytest.approx(1.0) and result["b"]["total_ms"] == pytest.approx(2.0)
    assert result["b"]["min_ms"] == pytest.approx(2.0)
    assert timing.per_round_ratio(result, "b", "a") == pytest.approx(2.0)  # the slow round cancels


def test_round_robin_settles_each_step_untimed_before_timing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """settle=1: every timed run follows an untimed one of the same step (its own steady state),
    and only the timed runs count: here the settling runs take 100 ms, the timed ones 1 ms."""
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    calls: list[str] = []

    def step(name: str) -> tuple[str, Any]:
        def run() -> None:
            previous = calls[-1] if calls else None
            now[0] += 1e-3 if previous == name else 0.1  # a run right after itself is fast
            calls.append(name)

        return name, run

    result = timing.round_robin([step("a"), step("b")], torch.device("cpu"), repeats=2, settle=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert result["a"]["runs_ms"] == pytest.approx([1.0, 1.0]) and result["b"]["runs_ms"] == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize(
    "argv",
    [["--quick", "--tiny"], ["--sections", "nope"], ["--threads", "0"], ["--device", "tpu"]],
)
def test_parse_args_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(argv)


def test_parse_args_defaults() -> None:
    args = cli.parse_args([])
    assert args.sections == list(cli.SECTIONS)
    assert args.out == Path("bench_results/bench.json")
    assert not args.quick and not args.tiny


@pytest.mark.parametrize(
    ("command", "cwd"),
    # the folder form in make test-all only: the same package, started another way
    [pytest.param(["scripts/knet_bench"], ROOT, marks=pytest.mark.slow), (["-m", "knet_bench"], ROOT / "scripts")],
    ids=["folder", "module"],
)
def test_the_package_runs_without_the_script(command: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, *command, "--help"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--memory-format" in proc.stdout


def test_make_scene_is_a_partition_with_contiguous_labels() -> None:
    rng = np.random.default_rng(0)
    seg, labels = common.make_scene(rng, 40, 56, num_things=5, num_stuff=3)
    assert seg.shape == (40, 56) and seg.dtype == np.int32
    ids = np.unique(seg)
    assert ids.tolist() == list(range(1, len(labels) + 1))  # no void, no missing segment
    assert ((labels >= 0) & (labels < common.NUM_CLASSES)).all()
    # the 3 stuff bands may be occluded by things, but never all of them
    assert (labels >= common.NUM_THINGS).any()
    target = common.scene_target(seg, labels, torch.device("cpu"))
    assert target["masks"].shape == (len(labels), 40, 56)
    assert bool((target["masks"].sum(0) == 1).all())


def test_written_coco_panoptic_files_read_back(tmp_path: Path) -> None:
    from knet_lightning.data.coco import COCOPanopticDataset

    bench_data.write_coco_panoptic(tmp_path, num_images=2, size=(24, 40), scene=(3, 2), seed=1)
    ds = COCOPanopticDataset(tmp_path, "train")
    assert len(ds) == 2 and ds.class_info.num_things == 80 and ds.class_info.num_stuff == 53
    rng = np.random.default_rng(1)
    for i in range(2):
        seg, labels = common.make_scene(rng, 24, 40, 3, 2)
        rng.integers(0, 256, size=(len(labels) + 1, 3))  # replay the colour and noise draws
        rng.normal(0.0, 20.0, size=(24, 40, 3))
        image, target = ds[i]
        assert tuple(image.shape) == (3, 24, 40)
        assert target["labels"].tolist() == labels.tolist()
        assert torch.equal(target["panoptic"], torch.from_numpy(seg))


def test_a_failing_section_is_reported_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(ctx: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setitem(cli.SECTION_FUNCS, "data", broken)
    out = tmp_path / "b.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--tiny", "--device", "cpu", "--threads", "1", "--sections", "data", "eval", "--out", str(out)]
        rc = cli.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert rc == 1
    data = json.loads(out.read_text())
    assert list(data["sections"]) == ["eval", "data"]  # canonical order, not the command line's
    assert data["sections"]["eval"]["status"] == "ok"
    assert data["sections"]["data"]["status"] == "error"
    assert "RuntimeError: boom" in data["sections"]["data"]["reason"]
    assert "**error**: RuntimeError: boom" in capsys.readouterr().out


def test_profile_swin_l_tiny_knet_components_add_up(tmp_path: Path) -> None:
    """scripts/profile_swin_l.py --tiny (Swin-T): K-Net's components in both layouts, which add up
    to the run's total (the Mask2Former, backbone and ratio rows need the bench extra's transformers)."""
    out = tmp_path / "profile.json"
    has_hf = importlib.util.find_spec("transformers") is not None
    sections = ["knet", "knet-train", "backbones", "ratios"] if has_hf else ["knet", "knet-train"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_swin_l.py"), "--tiny", "--sizes", "64x64",
                           "--repeats", "2", "--sections", *sections, "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads(out.read_text())["sizes"]["64x64"]
    if has_hf:  # round robin: every backbone timed once per round
        assert [len(r["runs_ms"]) for r in entry["backbones"]] == [2, 2, 2]
        assert all(r["min_ms"] <= r["total_ms"] for r in entry["backbones"])
        ratios = entry["ratios"]  # K-Net Swin-T against the tiny Mask2Former, round robin
        assert ratios["model"] == "K-Net Swin-T / Mask2Former Swin (HF, tiny)"
        assert all(ratios[f"{m}_{k}_ms"] > 0 for m in ("knet", "m2f") for k in ("infer", "train"))
        assert ratios["infer_ratio"] > 0 and ratios["train_ratio"] > 0
        assert "inference" in proc.stdout and "training step" in proc.stdout
    train = entry["knet_train"]
    assert list(train["parts_ms"]) == list(common.TRAIN_PARTS) and train["total_ms"] > 0
    assert all(train["parts_ms"][k] > 0 for k in ("backbone", "fpn_neck", "losses", "backward", "optimizer"))
    assert "K-Net Swin-T training step" in proc.stdout
    rows = entry["knet"]
    assert [r["layout"] for r in rows] == ["nchw", "channels-last"] and rows[0]["model"] == "K-Net Swin-T"
    for row in rows:
        parts = row["parts_ms"]
        assert set(parts) == {"backbone", "fpn_neck", "kernel_head", "update_stages", "postprocess", "other"}
        assert all(v > 0 for k, v in parts.items() if k != "other")
        assert row["forward_ms"] == pytest.approx(sum(v for k, v in parts.items() if k != "postprocess"))
    assert "K-Net Swin-T nchw" in proc.stdout
