"""The README's quick start works as written.

The README's first shell block holds the setup command and the two commands. The setup
command builds a venv, which ``.ci/run`` does on every CI run (this test runs inside the
environment it made); ``pytest`` is this very suite. The test runs the block's
``flwr run . --stream`` line as written, plus ``--run-config`` for 1 round and a results
file, in a private ``FLWR_HOME`` with the local SuperLink on private ports (the variables
docs/running.md documents), so ``flwr run`` starts its local SuperLink itself as on a new
user's machine. Then it runs docs/running.md's block that stops that SuperLink and checks
that nothing the run started is left. ``flwr run --stream`` exits 0 when the run failed
too: the results file and the log judge the run.

Run with ``pytest -m slow tests/test_quickstart.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from _guide import GUIDE_TOKEN_VARIABLE, blocks_of, guide_blocks, kill_all, run_block, wait_until_gone

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETUP = "pip install -e '.[dev]'"


def readme_commands() -> list[str]:
    """The commands of the README's first shell block (comments and continuations joined)."""
    block = re.search(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_readme_block_has_the_setup_command_and_the_two_commands():
    commands = readme_commands()
    assert any(SETUP in command and "python3 -m venv .venv" in command for command in commands), commands
    assert "flwr run . --stream" in commands and "pytest" in commands, commands


@pytest.mark.slow
def test_the_readme_flwr_run_runs_one_round_and_its_local_superlink_stops(tmp_path, capsys):
    command = next(c for c in readme_commands() if c.startswith("flwr run"))
    results = tmp_path / "results.json"
    token = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="ftquick-")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FLWR_", "RAY_ADDRESS")) and not key.startswith("FEDTAN_LIVE")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # what the setup command's activate exports
        "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_TMPDIR": ray_tmp,  # short: Ray's Unix socket paths have at most 107 bytes
        GUIDE_TOKEN_VARIABLE: token,
    })
    transcript = tmp_path / "transcript.log"
    stop = blocks_of(guide_blocks(REPO / "docs" / "running.md"), "stop")
    assert len(stop) == 1, "docs/running.md: one 'bash guide-stop' block expected"
    try:
        run = run_block(f"""{command} --run-config "num-server-rounds=1 results-file='{results}'" """, "", env, REPO,
                        transcript, timeout=900)
    finally:
        stopped = run_block(stop[0], "", env, REPO, transcript, timeout=60)
        left = wait_until_gone(token, 30)
        if left:
            kill_all(token)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = transcript.read_text(errors="replace")
    assert run.returncode == 0, output[-6000:]
    assert "Starting local SuperLink" in output, output[-6000:]
    assert results.is_file(), output[-6000:]
    summary = json.loads(results.read_text())
    assert summary["config"]["strategy"] == "fedtan" and sorted(summary["test"]) == ["0", "1"], summary.keys()
    assert "FedTAN round 1 done" in output, output[-6000:]
    assert stopped.returncode == 0, output[-3000:]
    assert not left, f"still running after docs/running.md's stop block: {left}"
    with capsys.disabled():
        accuracy = summary["test"]["1"]["test-accuracy"]
        print(f"\n[quick start] flwr run . --stream, 1 round: test accuracy {accuracy:.2f}; local SuperLink stopped")
