"""Load and memory test of ``mode=serve`` on loopback, against sequential ``Segmenter`` calls.

    python scripts/serve_load.py --ckpt CKPT [--clients 8 --requests 50] [--memory-requests 2000]
                                 [--predict-images 5000] [--out serve_load.json]

1. ``Segmenter`` in this process, one image at a time: the reference results, throughput and
   latency of sequential calls.
2. ``mode=serve`` in a subprocess, with batching on (``serve.max_batch_size``) and off (1):
   ``--clients`` threads x ``--requests`` each, over keep-alive connections; every response is
   checked against the reference (same segments: classes, areas, scores), failures counted;
   throughput and p50 / p99 latency.
3. Memory: the server's RSS (all its processes) after a warm-up and over ``--memory-requests``
   more requests; ``mode=predict``'s RSS over ``--predict-images`` small images.

Prints a table and writes the JSON (``--out``). Every phase stops at ``--time-limit`` seconds.
The images are drawn here (coloured shapes on a gradient, ``--size`` pixels square) unless
``--inputs`` names a folder of them.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree_rss(pid: int) -> int:
    """Bytes of resident memory of ``pid`` and all its descendants (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class ServerProcess:
    """``python -m knet_lightning mode=serve ...`` in its own process group, ready when ``/health``
    says ``ok``; stopped with SIGINT (then SIGKILL of the group) on exit."""

    def __init__(self, args: list[str], cwd: Path, port: int, log: Path, startup: float = 180.0) -> None:
        self.args, self.cwd, self.port, self.log_path, self.startup = args, cwd, port, log, startup
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "knet_lightning", *self.args], cwd=self.cwd, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + self.startup
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                status, body, _ = request("GET", f"{self.url}/health", timeout=2)
                if status == 200 and body == b"ok":
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"the server was not healthy within {self.startup} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        assert self.proc is not None
        return process_tree_rss(self.proc.pid)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # what the group left behind (LitServe's workers), if anything
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()


def request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 60, connection: http.client.HTTPConnection | None = None) -> tuple[int, bytes, str]:  # fmt: skip
    """``(status, body, content type)`` of one request (on ``connection`` when given: keep-alive)."""
    rest = url.split("://", 1)[1]
    host, _, path = rest.partition("/")
    own = connection is None
    conn = connection or http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.request(method, "/" + path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Content-Type", "")
    finally:
        if own:
            conn.close()


# ---------------------------------------------------------------------------- images
def draw_images(count: int, size: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEG files of coloured shapes on a gradient, ``size`` pixels square."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        base = np.stack([np.add.outer(ramp, ramp) / 2 * rng.uniform(0.3, 1) for _ in range(3)], axis=2)
        image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
            x1, y1 = x0 + w, y0 + h
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def read_images(folder: Path, count: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    if not files:
        raise SystemExit(f"--inputs {folder}: no .jpg / .png files")
    return [p.read_bytes() for p in files]


# ---------------------------------------------------------------------------- results
def segments_of(result: Any) -> list[tuple[int, int, float | None]]:
    """``(label, area, score)`` of each segment of a ``SegmentationResult`` or a response body."""
    if isinstance(result, dict):
        return [(s["label"], s["area"], s["score"]) for s in result["segments"]]
    return [(s.label, s.area, s.score) for s in result.segments]


def same_segments(a: list[tuple[int, int, float | None]], b: list[tuple[int, int, float | None]]) -> bool:
    """Same classes and areas in order, scores within 1e-4."""
    if len(a) != len(b):
        return False
    for (la, aa, sa), (lb, ab, sb) in zip(a, b):
        if la != lb or aa != ab or (sa is None) != (sb is None) or (sa is not None and abs(sa - sb) > 1e-4):
            return False
    return True


def latency_summary(latencies: list[float], seconds: float, count: int) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))] if ordered else float("nan")
    return {
        "images_per_s": count / seconds if seconds else float("nan"),
        "p50_ms": statistics.median(ordered) * 1000 if ordered else float("nan"),
        "p99_ms": p99 * 1000,
        "seconds": seconds,
    }


def sequential(segmenter: Any, images: list[bytes], calls: int) -> tuple[list[Any], dict[str, float]]:
    """The reference result of each distinct image, and the rate of ``calls`` sequential calls."""
    decoded = [np.array(Image.open(io.BytesIO(data)).convert("RGB")) for data in images]
    reference = [segments_of(segmenter(image)) for image in decoded]
    latencies = []
    start = time.perf_counter()
    for k in range(calls):
        t = time.perf_counter()
        segmenter(decoded[k % len(decoded)])
        latencies.append(time.perf_counter() - t)
    return reference, latency_summary(latencies, time.perf_counter() - start, calls)


def load(url: str, images: list[bytes], reference: list[Any], clients: int, requests: int,
         time_limit: float) -> dict[str, Any]:  # fmt: skip
    """``clients`` threads, ``requests`` each, round-robin over ``images``; every answer checked."""
    latencies: list[float] = []
    failures: list[str] = []
    mismatches = 0
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit
    host = url.split("://", 1)[1]

    def client(index: int) -> None:
        nonlocal mismatches
        conn = http.client.HTTPConnection(host, timeout=time_limit)
        try:
            for k in range(requests):
                if time.monotonic() > deadline:
                    with lock:
                        failures.append(f"client {index}: time limit reached after {k} requests")
                    return
                which = (index * requests + k) % len(images)
                t = time.perf_counter()
                try:
                    status, body, _ = request("POST", f"{url}/predict", images[which],
                                              {"Content-Type": "image/jpeg"}, connection=conn)  # fmt: skip
                except (OSError, http.client.HTTPException) as err:
                    with lock:
                        failures.append(f"client {index} request {k}: {err!r}")
                    conn.close()
                    conn = http.client.HTTPConnection(host, timeout=time_limit)
                    continue
                elapsed = time.perf_counter() - t
                with lock:
                    if status != 200:
                        failures.append(f"client {index} request {k}: HTTP {status} {body[:200]!r}")
                        continue
                    latencies.append(elapsed)
                    if not same_segments(segments_of(json.loads(body)), reference[which]):
                        mismatches += 1
        finally:
            conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    return latency_summary(latencies, seconds, len(latencies)) | {
        "requests": clients * requests, "ok": len(latencies), "failed": len(failures),
        "mismatches": mismatches, "failures": failures[:20],
    }  # fmt: skip


def memory_run(server: ServerProcess, images: list[bytes], count: int, warmup: int, samples: int,
               time_limit: float) -> dict[str, Any]:  # fmt: skip
    """RSS of the server's processes after ``warmup`` requests, and over ``count`` more."""
    host = server.url.split("://", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=60)
    headers = {"Content-Type": "image/jpeg"}
    for k in range(warmup):
        request("POST", f"{server.url}/predict", images[k % len(images)], headers, connection=conn)
    rss = [(0, server.rss())]
    every = max(1, count // samples)
    failed = 0
    deadline = time.monotonic() + time_limit
    done = 0
    for k in range(count):
        if time.monotonic() > deadline:
            break
        status, _, _ = request("POST", f"{server.url}/predict", images[k % len(images)], headers, connection=conn)
        failed += status != 200
        done += 1
        if (k + 1) % every == 0:
            rss.append((k + 1, server.rss()))
    conn.close()
    return rss_summary(rss) | {"requests": done, "asked": count, "warmup": warmup, "failed": failed}


def rss_summary(rss: list[tuple[int, int]]) -> dict[str, Any]:
    values = [v for _, v in rss]
    return {
        "rss_start_mb": values[0] / 2**20,
        "rss_end_mb": values[-1] / 2**20,
        "rss_max_mb": max(values) / 2**20,
        "growth_mb": (values[-1] - values[0]) / 2**20,
        "samples": [(n, round(v / 2**20, 1)) for n, v in rss],
    }


def predict_memory(ckpt: Path, count: int, size: int, workdir: Path, samples: int, time_limit: float,
                   extra: list[str]) -> dict[str, Any]:  # fmt: skip
    """``mode=predict`` over ``count`` images: its RSS against the overlays written so far; the
    first sample is taken once a tenth of the images are done (the warm-up)."""
    photos = workdir / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    distinct = draw_images(min(count, 16), size, seed=1)
    for k in range(count):
        (photos / f"{k:06d}.jpg").write_bytes(distinct[k % len(distinct)])
    out = workdir / "predict_run"
    args = [sys.executable, "-m", "knet_lightning", "mode=predict", f"ckpt_path={ckpt}", f"inputs={photos}",
            f"hydra.run.dir={out}", *extra]  # fmt: skip
    log = (workdir / "predict.log").open("wb")
    proc = subprocess.Popen(args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    overlays = out / "predictions" / "overlays"
    rss: list[tuple[int, int]] = []
    warm = max(1, count // 10)
    every = max(1, (count - warm) // samples)
    deadline = time.monotonic() + time_limit
    next_at = warm
    while proc.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        done = sum(1 for _ in overlays.iterdir()) if overlays.is_dir() else 0
        if done >= next_at:
            rss.append((done, process_tree_rss(proc.pid)))
            next_at = done + every
        time.sleep(0.05)
    log.close()
    summary_file = out / "predictions" / "summary.json"
    done = json.loads(summary_file.read_text())["done"] if summary_file.is_file() else 0
    if not rss:
        return {"images": count, "done": done, "returncode": proc.returncode, "error": "finished before a sample"}
    return rss_summary(rss) | {"images": count, "done": done, "returncode": proc.returncode}


# ---------------------------------------------------------------------------- main
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint to serve")
    parser.add_argument("--inputs", type=Path, help="a folder of images (default: drawn here)")
    parser.add_argument("--images", type=int, default=8, help="distinct images")
    parser.add_argument("--size", type=int, default=128, help="side of the drawn images (pixels)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--max-batch-size", type=int, default=4, help="serve.max_batch_size with batching on")
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--precision", default="fp32", help="server and Segmenter (fp32: results comparable exactly)")
    parser.add_argument("--memory-requests", type=int, default=2000, help="0: no server memory run")
    parser.add_argument("--memory-warmup", type=int, default=100)
    parser.add_argument("--predict-images", type=int, default=5000, help="0: no mode=predict memory run")
    parser.add_argument("--predict-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=20, help="RSS samples per memory run")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds per phase")
    parser.add_argument("--sequential-calls", type=int, default=0, help="0: clients x requests")
    parser.add_argument("--out", type=Path, default=Path("serve_load.json"))
    parser.add_argument("--workdir", type=Path, help="where servers run (default: a temporary folder)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from knet_lightning import Segmenter

    images = read_images(args.inputs, args.images) if args.inputs else draw_images(args.images, args.size)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="serve_load_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt.resolve()
    segmenter = Segmenter.from_checkpoint(ckpt, precision=args.precision)
    calls = args.sequential_calls or args.clients * args.requests
    reference, seq = sequential(segmenter, images, calls)
    del segmenter
    record: dict[str, Any] = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sequential_segmenter": seq | {"calls": calls},
    }  # fmt: skip
    for name, batch in (("batching_on", args.max_batch_size), ("batching_off", 1)):
        port = free_port()
        serve_args = [f"ckpt_path={ckpt}", "mode=serve", f"serve.port={port}", f"serve.max_batch_size={batch}",
                      f"serve.batch_timeout={args.batch_timeout}", f"serve.precision={args.precision}",
                      f"hydra.run.dir={workdir / name}"]  # fmt: skip
        with ServerProcess(serve_args, workdir, port, workdir / f"{name}.log") as server:
            for data in images:  # warm-up: one request per image
                request("POST", f"{server.url}/predict", data, {"Content-Type": "image/jpeg"})
            record[name] = load(server.url, images, reference, args.clients, args.requests, args.time_limit)
            if name == "batching_on" and args.memory_requests:
                record["server_memory"] = memory_run(server, images, args.memory_requests, args.memory_warmup,
                                                     args.samples, args.time_limit)  # fmt: skip
    if args.predict_images:
        record["predict_memory"] = predict_memory(ckpt, args.predict_images, args.predict_size, workdir / "predict",
                                                  args.samples, args.time_limit,
                                                  [f"predict.precision={args.precision}"])  # fmt: skip
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return record


def print_table(record: dict[str, Any]) -> None:
    print(f"{'run':<22} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ok':>6} {'failed':>6} {'mismatch':>8}")
    for name in ("sequential_segmenter", "batching_on", "batching_off"):
        row = record.get(name)
        if row:
            print(f"{name:<22} {row['images_per_s']:>9.1f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
                  f"{row.get('ok', row.get('calls', 0)):>6} {row.get('failed', 0):>6} {row.get('mismatches', 0):>8}")  # fmt: skip
    for name, unit in (("server_memory", "requests"), ("predict_memory", "images")):
        row = record.get(name)
        if row and "rss_start_mb" in row:
            count = row.get("requests", row.get("done"))
            print(f"{name}: RSS {row['rss_start_mb']:.0f} -> {row['rss_end_mb']:.0f} MB (max {row['rss_max_mb']:.0f}, "
                  f"growth {row['growth_mb']:+.1f} MB) over {count} {unit}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = run(args)
    print_table(record)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    failed = sum(record[n]["failed"] + record[n]["mismatches"] for n in ("batching_on", "batching_off"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
