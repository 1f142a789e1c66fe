"""Launching the two-rank scripts beside this file (DDP and FSDP on 2 CPU gloo processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run one of the scripts beside this file on 2 gloo processes, on a port of its own (runs at the
    same time on one machine must not meet on Lightning's default port)."""
    path = os.path.join(os.path.dirname(__file__), script)
    site = os.path.join(os.path.dirname(__file__), "_site")  # sitecustomize: the process group ends before exit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, ROOT]), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


EXIT_ABORT = "terminate called without an active exception"  # gloo's threads at interpreter exit


def _succeeded(proc: subprocess.CompletedProcess, reports: Sequence[str]) -> bool:
    """The script succeeded; or it wrote every report, whole, and only then did a process abort at
    interpreter exit with gloo's threads still alive (what the checks read was finished before it)."""
    if proc.returncode == 0:
        return True
    if EXIT_ABORT not in proc.stderr or "Traceback" in proc.stderr or not reports:
        return False
    try:
        for path in reports:
            with open(path) as f:
                json.load(f)
    except (OSError, ValueError):
        return False
    return True


def run_two_ranks(script: str, tmp_path, *args: str, report: bool = True, timeout: float = 240) -> list[dict]:
    """Run a script that must succeed, with ``tmp_path`` as its first argument; each rank's JSON report
    (``rank<r>.json``) when ``report``."""
    proc = launch_two_ranks(script, str(tmp_path), *args, timeout=timeout)
    paths = [str(tmp_path / f"rank{r}.json") for r in (0, 1)] if report else []
    assert _succeeded(proc, paths), proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] if report else []


def run_two_ranks_each(script: str, tmp_path, modes: Sequence[str], timeout: float = 360) -> dict[str, list[dict]]:
    """Run a script once for several ``modes`` in one launch (the two processes start once: their
    imports take most of a short run), each mode's fit after the other's, each writing its reports to
    ``tmp_path/<mode>``; the reports by mode."""
    proc = launch_two_ranks(script, str(tmp_path), ",".join(modes), timeout=timeout)
    assert _succeeded(proc, [str(tmp_path / m / f"rank{r}.json") for m in modes for r in (0, 1)]), proc.stderr[-3000:]
    return {m: [json.loads((tmp_path / m / f"rank{r}.json").read_text()) for r in (0, 1)] for m in modes}


def each_mode(main: Callable[..., None], argv: Sequence[str]) -> None:
    """A script's entry point: ``main(out, *rest)``; with several comma-separated modes (the second
    argument), ``main(out/<mode>, mode)`` for each in turn, in the same two processes."""
    if len(argv) < 2 or "," not in argv[1]:
        main(*argv)
        return
    out, modes = argv[0], argv[1].split(",")
    for mode in modes:
        os.makedirs(os.path.join(out, mode), exist_ok=True)
        main(os.path.join(out, mode), mode)
