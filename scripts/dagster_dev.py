"""`dagster dev` for the UI scripts (``ui_check.py``, ``ui_browser.py``): started on 127.0.0.1
only, in its own process group (one SIGTERM stops the webserver, the daemon and the code
server), ready once its GraphQL API lists the code location's assets, stopped with SIGTERM and,
after a grace period, SIGKILL (``../shared/ENVIRONMENT.md``: how to stop it cleanly)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env: dict, log_path: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """``dagster dev`` on 127.0.0.1 over ``workspace.yaml`` with ``env``; its output in ``log_path``."""
    port = port or free_port()
    server = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        cwd=REPO,
        stdout=open(log_path, "w"),  # noqa: SIM115 - the server writes it until it stops
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: one SIGTERM stops the whole tree
    )
    return server, port


def gql(port: int, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
    """One GraphQL query; its ``data``."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = json.loads(resp.read())
    if body.get("errors"):
        raise RuntimeError(f"GraphQL errors: {body['errors']}")
    return body["data"]


def wait_ready(port: int, timeout: float = 180) -> bool:
    """True once the server answers and its code location has loaded (it lists asset nodes;
    the location loads in the background after the server answers)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if gql(port, "query { assetNodes { id } }", timeout=5).get("assetNodes"):
                return True
        except Exception:
            pass
        time.sleep(1)
    return False


def stop(server: subprocess.Popen, grace: float = 30) -> bool:
    """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds; True when it
    stopped on SIGTERM."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=grace)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        return False
