"""A local Prefect server (SQLite under PREFECT_HOME, loopback only) and a process worker, for
`make server` and the end-to-end tests.

    python -m flows.local [--port 4200] [--pool statefarm-pool]

Starts `prefect server start --host 127.0.0.1`, waits until /api/health answers, then starts
`prefect worker start --pool <pool> --type process` (which creates the pool if it is missing).
Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.env import set_offline_env

POOL = "statefarm-pool"
PORT = 4200


def prefect_cli() -> list[str]:
    """The `prefect` CLI of this interpreter's environment."""
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def api_url(port: int = PORT) -> str:
    return f"http://127.0.0.1:{port}/api"


def start_server(port: int = PORT, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """`prefect server start` on loopback, in its own process group (stop it with `stop`)."""
    return subprocess.Popen([*prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, start_new_session=True, **popen)


def start_worker(pool: str = POOL, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """A process worker on ``pool`` (created if missing), in its own process group."""
    return subprocess.Popen([*prefect_cli(), "worker", "start", "--pool", pool, "--type", "process"],
                            env=env, start_new_session=True, **popen)


def wait_for_api(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> float:
    """Poll ``<url>/health`` until it answers; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode} before answering")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - start
        time.sleep(0.25)
    raise TimeoutError(f"no answer from {url}/health within {timeout:.0f}s")


def stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--pool", default=POOL)
    args = parser.parse_args(argv)
    set_offline_env()
    env = dict(os.environ)
    url = api_url(args.port)
    server = worker = None
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if started with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        start = time.monotonic()
        server = start_server(args.port, env)
        wait_for_api(url, proc=server)
        print(f"Prefect server up in {time.monotonic() - start:.1f}s: UI http://127.0.0.1:{args.port}, API {url}",
              flush=True)
        worker = start_worker(args.pool, {**env, "PREFECT_API_URL": url})
        print(f"worker started on pool {args.pool!r}; Ctrl-C stops both", flush=True)
        while server.poll() is None and worker.poll() is None:
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(worker)
        stop(server)


if __name__ == "__main__":
    raise SystemExit(main())
