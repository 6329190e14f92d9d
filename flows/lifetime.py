"""Nothing outlives a killed flow process. Its stage processes end with it (``pipeline.env.die_with_parent``);
Prefect's ephemeral API server, a uvicorn subprocess that Prefect starts on first use when no
``PREFECT_API_URL`` is set, does not: a SIGKILLed or SIGTERMed ``python -m flows.pipeline`` would leave it
running. ``bind_ephemeral_server`` starts that server up front and a watchdog process beside it, armed to be
signalled when the flow process dies, which then stops the server."""

from __future__ import annotations

import os
import subprocess
import sys

# The watchdog: SIGTERM (sent by the kernel when its parent, the flow process, dies) stops the server.
WATCHDOG = """
import ctypes, os, signal, sys
server, parent = int(sys.argv[1]), int(sys.argv[2])
def stop(*_):
    try:
        os.kill(server, signal.SIGTERM)
    except ProcessLookupError:
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:  # the flow process died before the signal was armed
    stop()
while True:
    signal.pause()
"""


def ephemeral() -> bool:
    """True when flows here would run against Prefect's ephemeral server (no API URL configured)."""
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def bind_ephemeral_server() -> subprocess.Popen | None:
    """Start Prefect's ephemeral server now (flows reuse it: one instance per process) and a watchdog that
    stops it when this process dies, however it dies. Linux only; elsewhere Prefect's own exit hook is
    all there is. Returns the watchdog (None where not armed)."""
    if not sys.platform.startswith("linux") or not ephemeral():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    if server.server_process is None:
        return None
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(server.server_process.pid), str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
