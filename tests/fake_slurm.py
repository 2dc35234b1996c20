"""A SLURM cluster on this machine, for running the documented SLURM commands as written.

:func:`install` writes ``sbatch``, ``srun``, ``sacct``, ``scontrol`` and ``scancel`` into a folder
that the tests put first on ``PATH``. They do what the real ones do for the options our configs and
our sbatch example use, on "nodes" that are loopback addresses of this machine (``127.0.0.1``,
``127.0.0.2``, ...: all of 127/8 is this host, and each node gets its own name):

* ``sbatch [options] script [args]``: options from the command line win over the script's
  ``#SBATCH`` lines; prints ``Submitted batch job <id>`` and returns; the job runs in a detached
  process (in the submit folder, with the submitting environment plus the ``SLURM_*`` variables of
  a batch step). ``--array=0-3%2`` runs array tasks, at most 2 at once; ``--output``/``--error``
  patterns (``%j %A %a %x``); ``--open-mode=append``; ``--signal=[B:]SIG@s``; ``--requeue``.
* ``srun [options] cmd``: one process per task of the job (``--nodes`` × ``--ntasks-per-node``),
  each with ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NODEID``, output per ``%t`` pattern;
  exits with the highest exit code of its tasks.
* ``scontrol requeue <id>``: the running instance is ended (SIGTERM to every task, SIGKILL after
  ``KillWait``) and the job starts again with the same id and ``SLURM_RESTART_COUNT`` + 1.
* ``sacct -j <id> -o JobID,State,NodeList --parsable2``: the states submitit polls.

The time limit: a real job's comes after ``--time``; here it comes when a file matching the glob
in ``$FAKE_SLURM_TIME_LIMIT`` appears (a test's callback writes it at a chosen step). Then, as
SLURM does, the ``--signal`` signal goes to every task of the running step, and
``$FAKE_SLURM_TIME_LIMIT_GRACE`` seconds later (the ``@s`` lead, shortened) the job ends: SIGTERM to
every task and the batch shell, SIGKILL after ``KillWait`` (``$FAKE_SLURM_KILL_WAIT``, 60 s).
Only the first instance of a job hits it (the requeued one runs to its end).

Every call is appended to ``<state>/calls.log``; job states live in ``<state>/jobs/``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

COMMANDS = ("sbatch", "srun", "sacct", "scontrol", "scancel")
# sbatch/srun short options that take a value, by their long name
SHORT = {"-N": "nodes", "-n": "ntasks", "-J": "job-name", "-o": "output", "-e": "error", "-p": "partition",
         "-t": "time", "-A": "account", "-a": "array", "-c": "cpus-per-task", "-G": "gpus"}  # fmt: skip
FLAGS = {"requeue", "no-requeue", "unbuffered", "exclusive", "label", "kill-on-bad-exit", "wait", "parsable"}


def install(bin_dir: Path, state_dir: Path) -> Path:
    """Writes the commands into ``bin_dir`` (put it first on ``PATH``); returns ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "jobs").mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} "
                          f"{shlex.quote(str(state_dir))} {name} \"$@\"\n")  # fmt: skip
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def calls(state_dir: Path) -> list[list[str]]:
    """Every command line the fake cluster received, in order (``[name, *args]``)."""
    log = state_dir / "calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def job_states(state_dir: Path) -> dict[str, dict[str, Any]]:
    """``{job id: record}`` of every job (array tasks as ``<array id>_<index>``)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((state_dir / "jobs").glob("*.json"))}


def wait_for_jobs(state_dir: Path, timeout: float = 600) -> dict[str, dict[str, Any]]:
    """Waits until no job is pending or running; returns :func:`job_states`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(state_dir)
        if states and all(s["state"] not in ("PENDING", "RUNNING") for s in states.values()):
            return states
        time.sleep(0.5)
    raise TimeoutError(f"fake SLURM jobs still running after {timeout} s: {job_states(state_dir)}")


# ---------------------------------------------------------------------- option parsing


def parse_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--a=b``, ``--a b``, ``-N 2``, flags; stops at the first word that is not an option."""
    options: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if not eq and name not in FLAGS:
                i += 1
                value = argv[i]
            options[name] = value if (eq or name not in FLAGS) else "1"
        elif word[:2] in SHORT:
            value = word[2:] or argv[i + 1]
            i += 0 if word[2:] else 1
            options[SHORT[word[:2]]] = value
        else:
            raise SystemExit(f"fake slurm: unknown option {word}")
        i += 1
    return options, argv[i:]


def script_options(script: Path) -> dict[str, str]:
    """The ``#SBATCH`` lines before the script's first command."""
    words: list[str] = []
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            words += shlex.split(line[len("#SBATCH") :], comments=True)
        elif line.strip() and not line.startswith("#"):
            break
    return parse_options(words)[0]


# ---------------------------------------------------------------------- state


class State:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs = root / "jobs"

    def log_call(self, argv: list[str]) -> None:
        with (self.root / "calls.log").open("a") as fh:
            fh.write(json.dumps(argv) + "\n")

    def new_id(self) -> int:
        counter = self.root / "next_id"
        with _locked(self.root / "next_id.lock"):
            job_id = int(counter.read_text()) if counter.is_file() else 4242
            counter.write_text(str(job_id + 100))
        return job_id

    def read(self, key: str) -> dict[str, Any]:
        return json.loads((self.jobs / f"{key}.json").read_text())

    def write(self, key: str, record: dict[str, Any]) -> None:
        tmp = self.jobs / f".{key}.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.jobs / f"{key}.json")

    def key_of(self, job_id: str) -> str | None:
        """An array task is named by ``<array id>_<index>`` or by its own ``SLURM_JOB_ID``."""
        if (self.jobs / f"{job_id}.json").is_file():
            return job_id
        for path in self.jobs.glob("*.json"):
            if json.loads(path.read_text())["job_id"] == job_id:
                return path.stem
        return None


class _locked:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        import fcntl

        self.fh = self.path.open("a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


# ---------------------------------------------------------------------- sbatch and its jobs


def sbatch(state: State, argv: list[str]) -> int:
    options, rest = parse_options(argv)
    if not rest:
        raise SystemExit("fake sbatch: no batch script given")
    script = Path(rest[0])
    merged = {**script_options(script), **options}
    array_id = state.new_id()
    indices: list[int] = []
    parallel = 1 << 30
    if "array" in merged:
        spec, _, limit = merged["array"].partition("%")
        lo, _, hi = spec.partition("-")
        indices = list(range(int(lo), int(hi or lo) + 1))
        parallel = int(limit) if limit else parallel
    nodes = int(merged.get("nodes", 1))
    tasks_per_node = int(merged.get("ntasks-per-node", max(1, int(merged.get("ntasks", 1)) // nodes)))
    base = {"script": str(script.resolve()), "args": rest[1:], "options": merged, "cwd": os.getcwd(),
            "env": dict(os.environ), "nodes": nodes, "tasks_per_node": tasks_per_node, "restarts": 0}  # fmt: skip
    keys = []
    for n, index in enumerate(indices or [None]):
        key = f"{array_id}_{index}" if index is not None else str(array_id)
        job_id = str(array_id + n + 1) if index is not None else str(array_id)
        state.write(key, {**base, "key": key, "job_id": job_id, "array_job_id": str(array_id) if index is not None else None,
                          "array_task_id": index, "state": "PENDING", "exit_codes": []})  # fmt: skip
        keys.append(key)
    subprocess.Popen([sys.executable, __file__, str(state.root), "_run", str(parallel), *keys],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=open(state.root / f"runner.{array_id}.log", "a"))  # fmt: skip
    print(f"Submitted batch job {array_id}", flush=True)
    return 0


def _fill(pattern: str, values: dict[str, str]) -> str:
    """SLURM's file name patterns (``%j %A %a %x %t %n %N %s %%``); one not in ``values`` stays."""
    return re.sub(r"%([jAaxtnNs%])", lambda m: values.get(m.group(1), m.group(0)), pattern)


def _job_values(record: dict[str, Any]) -> dict[str, str]:
    array = record["array_job_id"]
    return {"j": record["job_id"], "A": array or record["job_id"], "a": str(record["array_task_id"] or 0),
            "x": _job_name(record), "%": "%"}  # fmt: skip


def _job_name(record: dict[str, Any]) -> str:
    """``--job-name``, by default the batch script's file name, as SLURM's."""
    return record["options"].get("job-name", Path(record["script"]).name)


def _node_names(nodes: int) -> list[str]:
    return [f"127.0.0.{i + 1}" for i in range(nodes)]


def _batch_env(record: dict[str, Any]) -> dict[str, str]:
    nodes, per_node = record["nodes"], record["tasks_per_node"]
    env = dict(record["env"])
    env.update(
        SLURM_JOB_ID=record["job_id"], SLURM_JOBID=record["job_id"],
        SLURM_JOB_NAME=_job_name(record),
        SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST=",".join(_node_names(nodes)), SLURM_NODELIST=",".join(_node_names(nodes)),
        SLURM_NTASKS=str(nodes * per_node), SLURM_NPROCS=str(nodes * per_node),
        SLURM_NTASKS_PER_NODE=str(per_node), SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})",
        SLURM_SUBMIT_DIR=record["cwd"], SLURM_RESTART_COUNT=str(record["restarts"]),
        SLURM_CPUS_PER_TASK=str(record["options"].get("cpus-per-task", 1)),
        SLURMD_NODENAME=_node_names(nodes)[0], FAKE_SLURM_JOB_KEY=record["key"],
    )  # fmt: skip
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        env.pop(key, None)
    if record["array_job_id"] is not None:
        env.update(SLURM_ARRAY_JOB_ID=record["array_job_id"], SLURM_ARRAY_TASK_ID=str(record["array_task_id"]))
    return env


def _task_pids(state: State, key: str) -> list[int]:
    """The processes the job's ``srun`` started (``<key>.pids``, one per line)."""
    pid_file = state.jobs / f"{key}.pids"
    return [int(p) for p in pid_file.read_text().split()] if pid_file.is_file() else []


def _signal_tasks(state: State, key: str, signum: int, shell: subprocess.Popen | None = None) -> None:
    for pid in _task_pids(state, key) + ([shell.pid] if shell is not None else []):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _run_instance(state: State, key: str) -> int:
    """One instance of the job: its batch script to the end, or until it is requeued, cancelled or
    out of time."""
    record = state.read(key)
    record["state"] = "RUNNING"
    state.write(key, record)
    options = record["options"]
    default_out = "slurm-%A_%a.out" if record["array_job_id"] else "slurm-%j.out"
    out_path = Path(record["cwd"], _fill(options.get("output", default_out), _job_values(record)))
    err_path = Path(record["cwd"], _fill(options["error"], _job_values(record))) if "error" in options else None
    mode = "a" if options.get("open-mode") == "append" or record["restarts"] else "w"
    # a real job waits in the queue for a while after sbatch has answered: submitit creates the
    # job's log folder in that time (after sbatch gave it the job id), so give it a moment here too
    deadline = time.monotonic() + float(os.environ.get("FAKE_SLURM_QUEUE_WAIT", 60))
    folders = [out_path.parent] + ([err_path.parent] if err_path is not None else [])
    while not all(f.is_dir() for f in folders) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:  # as SLURM: the output's folder must exist (nothing creates it), else the job fails
        out = out_path.open(mode)
        err = err_path.open(mode) if err_path is not None else subprocess.STDOUT
    except OSError as error:
        record["error"] = str(error)
        state.write(key, record)
        return 1
    (state.jobs / f"{key}.pids").unlink(missing_ok=True)
    shell = subprocess.Popen(["bash", record["script"], *record["args"]], cwd=record["cwd"], env=_batch_env(record),
                             stdout=out, stderr=err, start_new_session=True)  # fmt: skip
    flag = os.environ.get("FAKE_SLURM_TIME_LIMIT") if record["restarts"] == 0 else None
    signal_spec = options.get("signal", "")
    kill_wait = float(os.environ.get("FAKE_SLURM_KILL_WAIT", 60))
    ending_since: float | None = None
    while shell.poll() is None:
        time.sleep(0.2)
        requeued = (state.jobs / f"{key}.requeue").exists() or (state.jobs / f"{key}.cancel").exists()
        if flag and glob.glob(flag):
            flag = None
            if signal_spec:  # --signal=[B:]SIG@s: to the tasks, or with B: to the batch shell only
                name = signal_spec.split("@")[0]
                batch_only = name.startswith("B:")
                signum = getattr(signal, "SIG" + name.removeprefix("B:").removeprefix("SIG"))
                if batch_only:
                    shell.send_signal(signum)
                else:
                    _signal_tasks(state, key, signum)
            time.sleep(float(os.environ.get("FAKE_SLURM_TIME_LIMIT_GRACE", 3)))
            record = state.read(key)
            record["timed_out"] = True
            state.write(key, record)
            requeued = True
        if requeued and ending_since is None:
            ending_since = time.monotonic()
            _signal_tasks(state, key, signal.SIGTERM, shell)
        elif ending_since is not None and time.monotonic() - ending_since > kill_wait:
            _signal_tasks(state, key, signal.SIGKILL)
            os.killpg(shell.pid, signal.SIGKILL)
    # as SLURM, the instance ends when the last process of the job has: the batch shell may die
    # of the SIGTERM before its srun's tasks have written their checkpoints
    ending_since = ending_since or time.monotonic()
    while _live_tasks(state, key):
        if time.monotonic() - ending_since > kill_wait:
            _signal_tasks(state, key, signal.SIGKILL)
        time.sleep(0.2)
    out.close()
    return shell.returncode


def _live_tasks(state: State, key: str) -> list[int]:
    """The job's task processes that still run (a zombie has ended)."""
    live = []
    for pid in _task_pids(state, key):
        try:
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if status != "Z":
            live.append(pid)
    return live


def _run_job(state: State, key: str) -> None:
    while True:
        rc = _run_instance(state, key)
        record = state.read(key)
        record["exit_codes"].append(rc)
        requeue = state.jobs / f"{key}.requeue"
        if requeue.exists() and record["options"].get("no-requeue") != "1":
            requeue.unlink()
            record.update(state="PENDING", restarts=record["restarts"] + 1, timed_out=False)
            state.write(key, record)
            continue
        if (state.jobs / f"{key}.cancel").exists():
            record["state"] = "CANCELLED"
        elif record.get("timed_out"):
            record["state"] = "TIMEOUT"
        else:
            record["state"] = "COMPLETED" if rc == 0 else "FAILED"
        state.write(key, record)
        return


def run_jobs(state: State, parallel: int, keys: list[str]) -> None:
    slots = threading.Semaphore(parallel)

    def one(key: str) -> None:
        with slots:
            _run_job(state, key)

    threads = [threading.Thread(target=one, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# ---------------------------------------------------------------------- inside a job


def _task_file(pattern: str, rank: int, env: dict[str, str]) -> str:
    """srun's ``--output``/``--error`` for task ``rank``."""
    values = {"j": env["SLURM_JOB_ID"], "A": env.get("SLURM_ARRAY_JOB_ID") or env["SLURM_JOB_ID"],
              "a": env.get("SLURM_ARRAY_TASK_ID", "0"), "x": env["SLURM_JOB_NAME"], "s": "0", "t": str(rank),
              "n": env["SLURM_NODEID"], "N": env["SLURMD_NODENAME"], "%": "%"}  # fmt: skip
    return _fill(pattern, values)


def srun(state: State, argv: list[str]) -> int:
    options, command = parse_options(argv)
    key = os.environ["FAKE_SLURM_JOB_KEY"]
    nodes = int(options.get("nodes", os.environ["SLURM_NNODES"]))
    per_node = int(options.get("ntasks-per-node", os.environ["SLURM_NTASKS_PER_NODE"]))
    if "ntasks" in options:
        per_node = max(1, int(options["ntasks"]) // nodes)
    names = _node_names(nodes)
    procs, files = [], []
    for rank in range(nodes * per_node):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
                   SLURM_NODEID=str(rank // per_node), SLURMD_NODENAME=names[rank // per_node],
                   SLURM_STEP_ID="0", SLURM_STEPID="0", SLURM_STEP_NUM_TASKS=str(nodes * per_node),
                   SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_NODELIST=",".join(names))  # fmt: skip
        out = err = None
        if "output" in options:
            out = open(_task_file(options["output"], rank, env), "a")
            files.append(out)
        if "error" in options:
            err = open(_task_file(options["error"], rank, env), "a")
            files.append(err)
        procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=err))
    with (state.jobs / f"{key}.pids").open("a") as fh:
        fh.write("".join(f"{p.pid}\n" for p in procs))
    # srun forwards the signals it gets to its tasks; the fake cluster signals the tasks directly
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, lambda *_: None)
    codes = [p.wait() for p in procs]
    for fh in files:
        fh.close()
    return max((c if c >= 0 else 128 - c) for c in codes)


def scontrol(state: State, argv: list[str]) -> int:
    if argv[:1] != ["requeue"] or len(argv) != 2:
        raise SystemExit(f"fake scontrol: only `scontrol requeue <job id>`, got {argv}")
    key = state.key_of(argv[1])
    if key is None or state.read(key)["state"] != "RUNNING":
        print(f"scontrol: error: Invalid job id specified for job {argv[1]}", file=sys.stderr)
        return 1
    (state.jobs / f"{key}.requeue").touch()
    return 0


def scancel(state: State, argv: list[str]) -> int:
    _, ids = parse_options(argv)
    for job_id in ids:
        key = state.key_of(job_id)
        keys = [key] if key else [p.stem for p in state.jobs.glob(f"{job_id}_*.json")]
        for k in keys:
            (state.jobs / f"{k}.cancel").touch()
    return 0


def sacct(state: State, argv: list[str]) -> int:
    options: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        if argv[i] in ("-j", "-o", "--jobs", "--format"):
            options.setdefault(argv[i], []).append(argv[i + 1])
            i += 2
        else:
            i += 1
    fields = ",".join(options.get("-o", []) + options.get("--format", [])) or "JobID,State"
    wanted = {j for ids in options.get("-j", []) + options.get("--jobs", []) for j in ids.split(",")}
    names = fields.split(",")
    print("|".join(names))
    for key, record in job_states(state.root).items():
        if wanted and key.split("_")[0] not in wanted and record["job_id"] not in wanted:
            continue
        values = {"JobID": key, "State": record["state"], "NodeList": ",".join(_node_names(record["nodes"]))}
        print("|".join(values.get(n, "") for n in names))
    return 0


def main(argv: list[str]) -> int:
    state = State(Path(argv[0]))
    name, args = argv[1], argv[2:]
    if name == "_run":
        run_jobs(state, int(args[0]), args[1:])
        return 0
    state.log_call([name, *args])
    return {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scontrol": scontrol, "scancel": scancel}[name](state, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
