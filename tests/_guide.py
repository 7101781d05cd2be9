"""Run a guide's shell blocks as written, and find what they left running.

A block is runnable when its fence's info string is ``bash guide-<role>`` (GitHub shows it
as bash). ``guide-vars`` blocks set the guide's variables and run before every other block,
as a reader in one shell would have them; the test sets those variables beforehand (private
ports, a private ``FLWR_HOME``), so the blocks' own defaults do not apply.

Every process the blocks start inherits ``GUIDE_TOKEN_VARIABLE`` in its environment, which
is how :func:`processes_with_token` finds them all afterwards, wherever they went (own
sessions, daemons).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping

GUIDE_TOKEN_VARIABLE = "FEDTAN_GUIDE_TOKEN"
_FENCE = re.compile(r"^```bash guide-([\w-]+)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def guide_blocks(path: Path) -> list[tuple[str, str]]:
    """``(role, script)`` of every runnable block of ``path``, in document order."""
    return [(match.group(1), match.group(2)) for match in _FENCE.finditer(path.read_text())]


def blocks_of(blocks: list[tuple[str, str]], role: str) -> list[str]:
    return [script for kind, script in blocks if kind == role]


def run_block(script: str, preamble: str, env: Mapping[str, str], cwd: Path, log: Path,
              timeout: float) -> subprocess.CompletedProcess:
    """Run ``preamble`` then ``script`` in one ``bash -e`` (output appended to ``log``)."""
    with log.open("a") as out:
        out.write(f"\n$ {script.strip()}\n")
        out.flush()
        return subprocess.run(["bash", "-e", "-c", f"{preamble}\n{script}"], env=dict(env), cwd=str(cwd),
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)


def processes_with_token(token: str) -> dict[int, str]:
    """{pid: command line} of the live processes whose environment carries the token."""
    found = {}
    marker = f"{GUIDE_TOKEN_VARIABLE}={token}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if marker not in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                continue
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                continue
            found[int(name)] = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def wait_until_gone(token: str, seconds: float) -> dict[int, str]:
    """Wait up to ``seconds`` for the token's processes to exit; those still alive."""
    deadline = time.monotonic() + seconds
    left = processes_with_token(token)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = processes_with_token(token)
    return left


def kill_all(token: str) -> None:
    """Clean up after a failed test: TERM, then KILL, every process carrying the token."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_with_token(token):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not wait_until_gone(token, 10):
            return
