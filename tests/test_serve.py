"""``mode=serve``: the HTTP server (LitServe), its refusals, its page in a real browser, its load.

One tiny panoptic model is trained through the CLI (thresholds stored low, so that it predicts
segments); one server runs it in a subprocess for the module, with batching on, fp32 and small
limits. Results are compared with ``Segmenter``'s on the same images.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_utils import compose_cfg, run_cfg, tiny_overrides
from PIL import Image

from knet_lightning import Segmenter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from serve_load import ServerProcess, free_port, process_tree_rss, request, same_segments, segments_of  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(600)]

TRAIN = tiny_overrides(
    "model.num_vis_images=0",
    "test_after_fit=false",
    "trainer.max_epochs=6",
    "model.postprocess.object_mask_thr=0.0",
    "model.postprocess.mask_thr=0.3",
)
MAX_BYTES = 200_000
MAX_PIXELS = 256 * 256


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """(checkpoint, the synthetic val images) of a 6-epoch tiny panoptic run."""
    tmp = tmp_path_factory.mktemp("serve_train")
    cfg = compose_cfg(tmp, TRAIN)
    run_cfg(cfg)
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt, sorted((Path(cfg.data.root) / "val2017").glob("*.jpg"))


@pytest.fixture(scope="module")
def segmenter(trained: tuple[Path, list[Path]]) -> Segmenter:
    return Segmenter.from_checkpoint(trained[0], precision="fp32")


@pytest.fixture(scope="module")
def server(trained: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    args = ["mode=serve", f"ckpt_path={trained[0]}", f"serve.port={port}", "serve.max_batch_size=4",
            "serve.batch_timeout=0.05", "serve.precision=fp32", f"serve.max_bytes={MAX_BYTES}",
            f"serve.max_pixels={MAX_PIXELS}", f"hydra.run.dir={tmp / 'run'}"]  # fmt: skip
    with ServerProcess(args, tmp, port, tmp / "server.log") as running:
        yield running


def post(server: ServerProcess, body: bytes, content_type: str | None = "image/jpeg", query: str = "",
         headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:  # fmt: skip
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    return request("POST", f"{server.url}/predict{query}", body, sent)


def multipart(fields: dict[str, tuple[str, bytes, str] | str]) -> tuple[bytes, str]:
    """A multipart/form-data body: ``name -> (file name, bytes, type)`` for files, ``name -> text``."""
    boundary = "knet-test-boundary"
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data, ctype = value
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    f"Content-Type: {ctype}\r\n\r\n").encode()  # fmt: skip
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode(), value.encode()
        parts.append(b"--" + boundary.encode() + b"\r\n" + head + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_array(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def assert_answers_correctly(server: ServerProcess, image: Path, segmenter: Segmenter) -> None:
    status, body, _ = post(server, image.read_bytes())
    assert status == 200, body[:300]
    assert same_segments(segments_of(json.loads(body)), segments_of(segmenter(image)))


# ---------------------------------------------------------------------------- endpoints
def test_health_and_info(server: ServerProcess, segmenter: Segmenter) -> None:
    status, body, _ = request("GET", f"{server.url}/health")
    assert (status, body) == (200, b"ok")
    status, body, ctype = request("GET", f"{server.url}/info")
    assert status == 200 and ctype.startswith("application/json")
    info = json.loads(body)
    model = info["model"]
    assert model["task"] == "panoptic"
    assert [c["name"] for c in model["classes"]] == segmenter.class_names
    assert [c["is_thing"] for c in model["classes"]] == segmenter.isthing
    assert [tuple(c["color"]) for c in model["classes"]] == segmenter.colors
    assert model["precision"] == "fp32" and model["backend"] == "torch"
    assert model["test_time"] == segmenter.test_time.to_dict()
    assert model["postprocess"]["object_mask_thr"] == 0.0  # the checkpoint's post-processing
    assert info["server"]["max_batch_size"] == 4 and info["server"]["max_bytes"] == MAX_BYTES


def test_predict_equals_segmenter_for_raw_multipart_and_json(server: ServerProcess, segmenter: Segmenter,
                                                             trained: tuple[Path, list[Path]]) -> None:  # fmt: skip
    counted = 0
    for path in trained[1][:3]:
        data = path.read_bytes()
        form, form_type = multipart({"image": (path.name, data, "image/jpeg")})
        as_json = json.dumps({"image": base64.b64encode(data).decode()}).encode()
        answers = [post(server, data), post(server, data, "application/octet-stream"), post(server, form, form_type),
                   post(server, as_json, "application/json")]  # fmt: skip
        assert all(status == 200 for status, _, _ in answers), [a[1][:200] for a in answers]
        bodies = [json.loads(body) for _, body, _ in answers]
        # the multipart upload names its file; otherwise the bodies are the same
        assert bodies[2]["result"].pop("file_name") == path.with_suffix(".png").name
        for body in bodies:
            body["result"].pop("file_name", None)
        assert bodies[0] == bodies[1] == bodies[2] == bodies[3]
        result = segmenter(path)
        body = bodies[0]
        assert (body["task"], body["height"], body["width"]) == ("panoptic", *result.size)
        assert [s["class_name"] for s in body["segments"]] == [s.class_name for s in result.segments]
        assert same_segments(segments_of(body), segments_of(result))
        official = result.to_coco()
        # scores to float rounding: the server's worker runs on its own threads
        served_info, own_info = body["result"]["segments_info"], official["segments_info"]
        assert [s.pop("score") for s in served_info] == pytest.approx([s["score"] for s in own_info], abs=1e-5)
        assert served_info == [{k: v for k, v in s.items() if k != "score"} for s in own_info]
        np.testing.assert_array_equal(png_array(base64.b64decode(body["result"]["png"])), np.array(official["png"]))
        counted += len(result.segments)
    assert counted > 0, "the model predicted no segment: nothing was compared"


def test_overlay_format_is_the_overlay_png(server: ServerProcess, segmenter: Segmenter,
                                           trained: tuple[Path, list[Path]]) -> None:  # fmt: skip
    path = trained[1][0]
    status, body, ctype = post(server, path.read_bytes(), query="?format=overlay")
    assert status == 200 and ctype == "image/png"
    np.testing.assert_array_equal(png_array(body), np.array(segmenter(path).overlay()))


def test_concurrent_requests_are_batched_and_equal_segmenter(server: ServerProcess, segmenter: Segmenter,
                                                             trained: tuple[Path, list[Path]]) -> None:  # fmt: skip
    """Eight clients at once, two image sizes: batches form (the header says how many images ran
    together), and every answer is the Segmenter's for its image alone."""
    small = trained[1][:4]
    big = []
    for path in small:
        buffer = io.BytesIO()
        Image.open(path).resize((96, 80)).save(buffer, format="PNG")
        big.append(buffer.getvalue())
    images = [p.read_bytes() for p in small] + big
    reference = [segments_of(segmenter(np.array(Image.open(io.BytesIO(data)).convert("RGB")))) for data in images]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda k: (k, post(server, images[k % 8])), range(24)))
    for k, (status, body, _) in answers:
        assert status == 200, body[:200]
        assert same_segments(segments_of(json.loads(body)), reference[k % 8]), f"request {k}"
    with ThreadPoolExecutor(8) as pool:  # the same size, sent together: the header says how many ran at once
        raw = list(pool.map(lambda k: _post_with_headers(server, images[k % 4]), range(8)))
    batches = [int(headers["x-batch-size"]) for status, headers in raw if status == 200]
    assert len(batches) == 8 and max(batches) > 1, batches


def _post_with_headers(server: ServerProcess, data: bytes) -> tuple[int, dict[str, str]]:
    import http.client

    conn = http.client.HTTPConnection(server.url.split("://", 1)[1], timeout=60)
    try:
        conn.request("POST", "/predict", body=data, headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


# ---------------------------------------------------------------------------- bad requests
def _bad_requests(image: bytes) -> dict[str, tuple[bytes, str | None, str, int, str]]:
    """name -> (body, content type, query, expected status, a phrase of the reason)."""
    png_big = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 20, 30)).save(png_big, format="PNG")
    form_without_file, form_type = multipart({"note": "no file here"})
    form_url, _ = multipart({"url": "http://127.0.0.1:9/x.jpg"})
    return {
        "not an image": (b"this is not an image" * 10, "image/jpeg", "", 400, "not an image"),
        "truncated": (image[: len(image) // 2], "image/jpeg", "", 400, "truncated"),
        "header cut short": (image[:40], "image/jpeg", "", 400, "header"),
        "zero bytes": (b"", "image/jpeg", "", 400, "0 bytes"),
        "text content type": (image, "text/plain", "", 415, "multipart/form-data"),
        "form-urlencoded (curl --data-binary)": (image, "application/x-www-form-urlencoded", "", 415, "image/*"),
        "over max_bytes": (b"\xff" * (MAX_BYTES + 10), "image/jpeg", "", 413, "serve.max_bytes"),
        "far over max_bytes": (b"\xff" * (MAX_BYTES * 5), "image/jpeg", "", 413, "serve.max_bytes"),
        "over max_pixels": (png_big.getvalue(), "image/png", "", 413, "serve.max_pixels"),
        "unknown format": (image, "image/jpeg", "?format=svg", 400, "format"),
        "multipart without a file": (form_without_file, form_type, "", 400, "'image'"),
        "multipart with a url": (form_url, form_type, "", 400, "never fetches"),
        "json without image": (b'{"picture": 1}', "application/json", "", 400, '"image"'),
        "json bad base64": (b'{"image": "***"}', "application/json", "", 400, "base64"),
        "json not an object": (b"[1, 2]", "application/json", "", 400, "JSON object"),
        "json unparsable": (b"{", "application/json", "", 400, "parsed"),
        "json url": (b'{"url": "http://127.0.0.1:9/x.jpg"}', "application/json", "", 400, "never fetches"),
    }


def test_every_bad_request_gets_a_4xx_with_a_reason_and_the_server_goes_on(
    server: ServerProcess, segmenter: Segmenter, trained: tuple[Path, list[Path]]
) -> None:
    image_path = trained[1][1]
    for name, (body, ctype, query, expected, phrase) in _bad_requests(image_path.read_bytes()).items():
        status, answer, answer_type = post(server, body, ctype, query)
        assert status == expected, f"{name}: {status} {answer[:300]!r}"
        assert answer_type.startswith("application/json"), name
        detail = json.loads(answer)["detail"]
        assert phrase in detail, f"{name}: {detail}"
        assert_answers_correctly(server, image_path, segmenter)
    assert request("GET", f"{server.url}/health")[:2] == (200, b"ok")


def test_a_refused_request_does_not_fail_the_others_in_its_batch(server: ServerProcess, segmenter: Segmenter,
                                                                 trained: tuple[Path, list[Path]]) -> None:  # fmt: skip
    """A truncated file is found by the worker, inside a batch: it alone gets its 400."""
    good = trained[1][2]
    data = good.read_bytes()
    bodies = [data[: len(data) // 2] if k % 2 else data for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: post(server, body), bodies))
    reference = segments_of(segmenter(good))
    for k, (status, body, _) in enumerate(answers):
        if k % 2:
            assert status == 400 and "truncated" in json.loads(body)["detail"]
        else:
            assert status == 200 and same_segments(segments_of(json.loads(body)), reference)


def test_the_server_never_fetches_a_url_a_client_sends(server: ServerProcess) -> None:
    hits: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    listener = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=listener.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.server_address[1]}/photo.jpg"
        form, form_type = multipart({"url": url})
        for body, ctype in ((json.dumps({"url": url}).encode(), "application/json"), (form, form_type),
                            (url.encode(), "image/jpeg"), (url.encode(), "text/uri-list")):  # fmt: skip
            status, _, _ = post(server, body, ctype)
            assert 400 <= status < 500
        time.sleep(0.5)
        assert hits == []
    finally:
        listener.shutdown()


# ---------------------------------------------------------------------------- process
def test_sigterm_stops_the_server_and_its_workers(trained: tuple[Path, list[Path]], tmp_path: Path) -> None:
    port = free_port()
    args = ["mode=serve", f"ckpt_path={trained[0]}", f"serve.port={port}", "serve.workers_per_device=2",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    with ServerProcess(args, tmp_path, port, tmp_path / "server.log") as running:
        info = json.loads(request("GET", f"{running.url}/info")[1])
        assert info["server"]["workers_per_device"] == 2
        assert process_tree_rss(running.proc.pid) > 0
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(timeout=60) == 0, running.output()[-3000:]
        deadline = time.monotonic() + 30  # the workers end after the main process, within LitServe's grace
        while _group_alive(running.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group_alive(running.proc.pid) == [], running.output()[-3000:]
        assert "Traceback" not in running.output(), running.output()[-3000:]


def _group_alive(pgid: int) -> list[int]:
    """Processes still alive in process group ``pgid`` (zombies excluded)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def test_mode_serve_needs_a_checkpoint(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, tiny_overrides("mode=serve"))
    with pytest.raises(ValueError, match="mode=serve needs ckpt_path"):
        run_cfg(cfg)


# ---------------------------------------------------------------------------- the page
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _browser(tmp_path: Path) -> Any:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = (f"no Chromium here ({CHROMIUM} and {CHROMEDRIVER}: Debian's chromium and chromium-driver, which "
                  "`make test` installs with apt-get where it can)")  # fmt: skip
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # as root in a container, offline: no sandbox, no GPU, none of Chromium's own network calls
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,800", f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_the_page_in_headless_chromium(server: ServerProcess, trained: tuple[Path, list[Path]],
                                       tmp_path: Path) -> None:  # fmt: skip
    """Load ``/``, choose an image, wait for the overlay; the legend names the classes the JSON
    answer has; a screenshot is kept (``KNET_SCREENSHOT`` names where, else the test's folder)."""
    import os

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    # an image with more than one class
    path = next(
        p for p in trained[1] if len({s["label"] for s in json.loads(post(server, p.read_bytes())[1])["segments"]}) > 1
    )
    photo = tmp_path / "photo.jpg"
    shutil.copy(path, photo)
    expected = json.loads(post(server, photo.read_bytes())[1])
    height, width = np.array(Image.open(photo)).shape[:2]
    driver = _browser(tmp_path)
    try:
        driver.get(server.url + "/")
        assert driver.title == "K-Net segmentation"
        WebDriverWait(driver, 30).until(
            expected_conditions.text_to_be_present_in_element((By.ID, "model"), "panoptic K-Net")
        )
        driver.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", driver.find_element(
            By.ID, "status"
        ).text
        overlay = driver.find_element(By.ID, "overlay")
        assert driver.execute_script("return arguments[0].naturalWidth", overlay) > width  # the image + its legend
        legend = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#legend .class-name")]
        assert legend == sorted({s["class_name"] for s in expected["segments"]},
                                key=lambda n: [s["label"] for s in expected["segments"] if s["class_name"] == n][0])  # fmt: skip
        rows = driver.find_elements(By.CSS_SELECTOR, "#segments tbody tr")
        assert len(rows) == len(expected["segments"])
        assert f"{width}x{height}" in driver.find_element(By.ID, "status").text
        shot = Path(os.environ.get("KNET_SCREENSHOT") or tmp_path / "serve-page.png")
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
        print(f"screenshot: {shot}; legend: {legend}")
    finally:
        driver.quit()
    shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


# ---------------------------------------------------------------------------- the docs page
SERVE_PAGE = "docs/guides/serve.md"


def serve_page_commands() -> list[str]:
    """Every ``python -m knet_lightning`` command of the Serve page's bash blocks, in order."""
    from docs_blocks import blocks, commands, read

    return [c for block in blocks(read(SERVE_PAGE)) for c in commands(block, "python -m knet_lightning")]


def serve_page_requests() -> list[str]:
    """The ``curl`` commands of the page's "Ask it" block."""
    from docs_blocks import blocks, commands, section

    return [c for block in blocks(section(SERVE_PAGE, "## Ask it")) for c in commands(block, "curl")]


def load_script_command() -> str:
    from docs_blocks import blocks, commands, read

    (command,) = [c for block in blocks(read(SERVE_PAGE)) for c in commands(block, "python scripts/serve_load.py")]
    return command


def _project(trained: tuple[Path, list[Path]], cwd: Path) -> Path:
    """A user's folder: the run under logs/train/runs/r1/ and a photo.jpg."""
    ckpt_dir = cwd / "logs" / "train" / "runs" / "r1" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(trained[0], ckpt_dir / "last.ckpt")
    shutil.copy(trained[1][0], cwd / "photo.jpg")
    return cwd


def test_the_serve_page_commands_run_as_written(trained: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Each command of docs/guides/serve.md in a fresh process, in a folder holding the run and the
    photo it names; each server on the documented port 8000, asked by the page's curl commands."""
    import shlex
    import subprocess

    from test_readme import _run

    cwd = _project(trained, tmp_path / "project")
    shown = serve_page_commands()
    assert len(shown) == 4, shown  # serve; serve with batching and workers; export; serve the .onnx
    for command in shown:
        args = shlex.split(command.replace("<run>", "r1"))[3:]
        if "mode=serve" not in args:
            proc = _run(args, cwd)
            assert proc.returncode == 0, f"{command}\n{proc.stderr[-4000:]}"
            continue
        with ServerProcess(args, cwd, 8000, tmp_path / "server.log") as server:
            info = json.loads(request("GET", f"{server.url}/info")[1])
            if "serve.backend=onnxruntime" in args:
                assert info["model"]["backend"] == "onnxruntime"
                expected = segments_of(
                    Segmenter.from_checkpoint(cwd / "model.onnx", backend="onnxruntime")(cwd / "photo.jpg")
                )
            else:
                expected = segments_of(Segmenter.from_checkpoint(trained[0])(cwd / "photo.jpg"))
            if "serve.workers_per_device=2" in args:
                assert (info["server"]["workers_per_device"], info["server"]["max_batch_size"]) == (2, 8)
            answers = []
            for curl in serve_page_requests():
                proc = subprocess.run(shlex.split(curl), cwd=cwd, capture_output=True, timeout=120)
                assert proc.returncode == 0, f"{curl}: {proc.stderr[-2000:]!r}"
                answers.append(proc.stdout)
            health, info_body, *predicted, _ = answers
            assert health == b"ok" and json.loads(info_body)["model"]["task"] == "panoptic"
            assert len(predicted) == 2 and json.loads(predicted[0])["segments"] == json.loads(predicted[1])["segments"]
            assert same_segments(segments_of(json.loads(predicted[0])), expected), command
            assert png_array((cwd / "overlay.png").read_bytes()).ndim == 3
            (cwd / "overlay.png").unlink()


def test_load_script_no_failures_results_equal_and_memory_flat(trained: tuple[Path, list[Path]],
                                                                 tmp_path: Path) -> None:  # fmt: skip
    """The page's scripts/serve_load.py command with small counts appended: every request
    answered and equal to Segmenter's, and the RSS of the server (over 150 requests after a
    warm-up of 30) and of mode=predict (over 120 images) flat."""
    import shlex
    import subprocess

    cwd = _project(trained, tmp_path / "project")
    small = ["--inputs", str(trained[1][0].parent), "--clients", "4", "--requests", "6", "--memory-requests", "150",
             "--memory-warmup", "30", "--predict-images", "120", "--samples", "5", "--time-limit", "240"]  # fmt: skip
    (cwd / "scripts").symlink_to(ROOT / "scripts")  # the command runs from a checkout's root
    args = shlex.split(load_script_command().replace("<run>", "r1"))[1:] + small
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((cwd / "serve_load.json").read_text())
    for name in ("batching_on", "batching_off"):
        assert record[name]["ok"] == 24 and record[name]["failed"] == 0 and record[name]["mismatches"] == 0
        assert record[name]["images_per_s"] > 0 and record[name]["p99_ms"] >= record[name]["p50_ms"]
    assert record["sequential_segmenter"]["calls"] == 24
    memory = record["server_memory"]
    assert memory["requests"] == 150 and memory["failed"] == 0
    assert memory["growth_mb"] < 40, memory["samples"]
    predict = record["predict_memory"]
    assert predict["done"] == 120 and predict["returncode"] == 0
    assert predict["growth_mb"] < 40, predict["samples"]
    assert "images/s" in proc.stdout and "server_memory" in proc.stdout
