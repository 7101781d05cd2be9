"""The deployment guide (docs/deployment.md) works as written.

Its runnable shell blocks (see tests/_guide.py) run in order, with the guide's own
variables set to 2 SuperNodes, 1 round, free loopback ports, and a private ``FLWR_HOME``
and ``DEPLOY_DIR``: the connection block twice (it must stay valid TOML), then start, run,
logs, stop and clean. The run must have completed (``flwr run --stream`` exits 0 on a
failed run too, so the status comes from ``flwr ls``), the node worker's log must carry the
data-source line the guide promises, and after the stop block nothing the blocks started
may be left running.

Run with ``pytest -m slow tests/test_deployment_guide.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
import uuid
from pathlib import Path

import pytest

from _guide import GUIDE_TOKEN_VARIABLE, blocks_of, guide_blocks, kill_all, run_block, wait_until_gone

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
NODES = 2


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive loopback ports nothing listens on now."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            base = int(sock.getsockname()[1])
        if base + count < 65536 and all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def test_the_guide_has_its_runnable_blocks():
    roles = [role for role, _ in guide_blocks(GUIDE)]
    assert roles.count("vars") == 1, roles
    for role in ("config", "start", "run", "logs", "stop", "clean"):
        assert roles.count(role) == 1, f"docs/deployment.md: one 'bash guide-{role}' block expected, found {roles}"


def test_the_deployment_guide_runs_as_written_and_leaves_nothing_running(tmp_path, capsys):
    blocks = guide_blocks(GUIDE)
    preamble = "\n".join(blocks_of(blocks, "vars"))
    token = uuid.uuid4().hex
    deploy_dir, flwr_home = tmp_path / "deployment", tmp_path / "flwr-home"
    runtime_dir = Path(tempfile.mkdtemp(prefix="ftguide-"))  # short: a Unix socket path has 108 bytes
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FLWR_", "RAY_ADDRESS")) and key not in ("FEDTAN_RUNTIME_DIR", "FEDTAN_LIVE_HOME",
                                                                           "FEDTAN_NODE_WORKER_SOCKET")}
    node_base = free_port_range(NODES)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "NODES": str(NODES), "ROUNDS": "1",
        "SUPERLINK_PORT": str(free_port_range(1)), "NODE_PORT_BASE": str(node_base),
        "FLWR_HOME": str(flwr_home), "DEPLOY_DIR": str(deploy_dir),
        "FEDTAN_RUNTIME_DIR": str(runtime_dir),
        "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
        GUIDE_TOKEN_VARIABLE: token,
    })
    transcript = tmp_path / "transcript.log"

    def run(role: str, timeout: float = 120.0) -> None:
        for script in blocks_of(blocks, role):
            result = run_block(script, preamble, env, REPO, transcript, timeout)
            assert result.returncode == 0, (f"the guide's '{role}' block failed (exit {result.returncode}):\n"
                                            f"{transcript.read_text()[-6000:]}")

    def flwr_json(*args: str) -> dict:
        result = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        return json.loads(result.stdout)

    try:
        run("config")
        run("config")  # again, as a reader re-running the guide would
        config = tomllib.loads((flwr_home / "config.toml").read_text())
        assert config["superlink"]["loopback"] == {"address": f"127.0.0.1:{env['SUPERLINK_PORT']}",
                                                   "insecure": True}, config
        run("start", timeout=300)
        assert f"{NODES} of {NODES} SuperNodes online" in transcript.read_text(), transcript.read_text()[-4000:]
        run("run", timeout=900)
        output = (deploy_dir / "run.log").read_text(errors="replace")
        match = re.search(r"Successfully started run (\d+)", output)
        assert match, output[-6000:]
        status = flwr_json("ls", "loopback", "--run-id", match.group(1))["runs"][0]
        assert status["status"] == "finished:completed", f"{status}\n{output[-6000:]}"
        assert "FedTAN round 1 done" in output, output[-6000:]
        run("logs")
        worker_logs = sorted(runtime_dir.glob("node-*.log"))
        assert len(worker_logs) == NODES, worker_logs
        for path in worker_logs:
            text = path.read_text(errors="replace")
            assert "FedTAN node worker pid" in text and "train split:" in text, f"{path}:\n{text[-3000:]}"
        pids = {path.name: int(path.read_text()) for path in deploy_dir.glob("*.pid")}
        assert len(pids) == NODES + 1, pids
    finally:
        stop = run_block("\n".join(blocks_of(blocks, "stop")), preamble, env, REPO, transcript, 180)
        left = wait_until_gone(token, 30)
        if left:
            kill_all(token)
    assert stop.returncode == 0, transcript.read_text()[-4000:]
    assert not left, f"still running after the guide's stop block: {left}"
    assert not list(deploy_dir.glob("*.pid")), list(deploy_dir.glob("*.pid"))
    assert not list(runtime_dir.glob("*.sock")), "a node worker left its socket behind"
    shutil.copytree(deploy_dir, tmp_path / "logs")  # kept for a look after the test; the clean block removes them
    for path in sorted(runtime_dir.glob("node-*.log")):
        shutil.copy(path, tmp_path / "logs" / path.name)
    run("clean")
    assert not deploy_dir.exists()
    shutil.rmtree(runtime_dir)  # the workers' .log and .lock files, which the guide says to remove
    with capsys.disabled():
        print(f"\n[deployment guide] {NODES} SuperNodes, 1 round: completed; stop left nothing running")
