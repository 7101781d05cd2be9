"""Start, drive and stop real Flower processes: experiments, benchmarks, end-to-end tests.

:func:`run_app` runs this app with ``flwr run`` against a private simulation SuperLink
(the way ``flwr run .`` does, minus the shared ``~/.flwr``) and returns the summary the
ServerApp writes.

A :class:`FlowerProcesses` owns one temporary ``FLWR_HOME`` (with its ``config.toml``),
free loopback ports, and every process it starts: SuperLinks, SuperNodes and the ``flwr``
CLI. :meth:`FlowerProcesses.stop` ends them all by PID, whatever state the test is in:

- each process is started in a new session (``start_new_session=True``) and gets
  SIGTERM, then SIGKILL after a grace period, to its process group;
- Flower starts its SuperExec in yet another session, and Ray starts its own services,
  so the processes are also found by the token (``FEDTAN_E2E_TOKEN``) every descendant
  inherits in its environment, and by walking ``/proc`` for descendants; those get the
  same treatment, by PID, with the PID's start time checked against reuse.

Nothing outside the temporary folders is touched: Ray's session files go to a private
``RAY_TMPDIR``, and ``~/.flwr`` is never read (``FLWR_HOME`` points to the temp folder).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

BIN = Path(sys.executable).parent
TOKEN_VAR = "FEDTAN_E2E_TOKEN"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
GRACE_SECONDS = 10.0

# Inherited variables that would change what the processes do.
_SCRUBBED = ("FLWR_HOME", "RAY_ADDRESS", "FEDTAN_MAX_LIVE_ROUNDS", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT",
             "FEDTAN_LIVE_HOME", "FEDTAN_NODE_WORKER_SOCKET", "FEDTAN_RAY_HOMES",
             # Deployment imports the app afresh for every message: let Python cache its
             # bytecode (in the temporary FLWR_HOME/apps copy).
             "PYTHONDONTWRITEBYTECODE")

_RUN_ID = re.compile(r"Successfully started run (\d+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (bind port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    """One value in TOML syntax, for ``--run-config`` / ``--federation-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if '"' in value or "\\" in value or "\n" in value:
            raise ValueError(f"value not supported on the flwr command line: {value!r}")
        return f'"{value}"'
    raise TypeError(f"unsupported config value {value!r}")


def config_arg(config: Mapping[str, Any]) -> str:
    """``{"a": 1, "b": "x"}`` -> ``'a=1 b="x"'``, the flwr CLI's key-value format."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


# ---------------------------------------------------------------------- /proc helpers
def _stat(pid: int) -> Optional[tuple[int, int, int, int]]:
    """(ppid, pgrp, session, starttime) of a live process, None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()  # fields 3.. of proc(5)
    if fields[0] in ("Z", "X"):  # zombie or dead: nothing left to stop
        return None
    return int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _has_token(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{TOKEN_VAR}={token}".encode() in environ.split(b"\0")


def related_processes(roots: Sequence[int], token: Optional[str]) -> dict[int, int]:
    """Live processes that belong to this harness: {pid: starttime}.

    The roots, their process groups and sessions, all their descendants, and (if
    ``token`` is given) every process whose environment carries it.
    """
    stats = {pid: s for pid in _all_pids() if (s := _stat(pid)) is not None}
    me = os.getpid()
    found: set[int] = set()
    roots = [r for r in roots if r in stats]
    for pid, (ppid, pgrp, sid, _) in stats.items():
        if pid != me and (pgrp in roots or sid in roots or (token is not None and _has_token(pid, token))):
            found.add(pid)
    found.update(roots)
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in stats.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child != me:
                found.add(child)
                stack.append(child)
    return {pid: stats[pid][3] for pid in found}


def _signal_pids(pids: Mapping[int, int], sig: int) -> None:
    for pid, starttime in pids.items():
        stat = _stat(pid)
        if stat is None or stat[3] != starttime:  # gone, or the PID was reused
            continue
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pids: Mapping[int, int]) -> dict[int, int]:
    out = {}
    for pid, starttime in pids.items():
        stat = _stat(pid)
        if stat is not None and stat[3] == starttime:
            out[pid] = starttime
    return out


# ---------------------------------------------------------------------- the harness
@dataclass
class RunOutcome:
    """What ``flwr run`` did: the run id, its final status and the CLI's output."""

    run_id: int
    status: str
    details: str
    wall_seconds: float
    output: str
    listing: dict


class FlowerProcesses:
    """A private Flower installation: FLWR_HOME, connections, processes; see module doc."""

    def __init__(self, root: Path, env: Optional[Mapping[str, str]] = None) -> None:
        self.root = Path(root)
        self.home = self.root / "flwr-home"
        self.logs = self.root / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.token = uuid.uuid4().hex
        # Short path: Ray puts Unix sockets under it (108-byte limit).
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="fte2e-"))
        base = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        self.env: dict[str, str] = {
            **base,
            "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            # SuperExec polls for work every 1 s by default, a delay every deployment
            # message pays; 0.2 s costs little CPU (0.05 s made each SuperNode ~8% busy).
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "RAY_TMPDIR": str(self.ray_tmp),
            # Node workers' sockets (flwr_fedtan.runtime.worker): private to this harness.
            "FEDTAN_RUNTIME_DIR": str(self.ray_tmp / "runtime"),
            "PYTHONUNBUFFERED": "1",
            TOKEN_VAR: self.token,
        }
        self.env.update(env or {})
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.connections: dict[str, str] = {}
        self.default_connection: Optional[str] = None
        self._used_ports: set[int] = set()
        self.ray_node_ids: dict[str, str] = {}  # Ray node id of each start_ray_node

    # -------------------------------------------------------------- plumbing
    def port(self) -> int:
        while True:
            port = free_port()
            if port not in self._used_ports:
                self._used_ports.add(port)
                return port

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def log_tail(self, name: str, lines: int = 60) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log for {name})"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, name: str, args: Sequence[str], env: Optional[Mapping[str, str]] = None,
              cwd: Optional[Path] = None) -> subprocess.Popen:
        """Start a long-running process in its own session, output to ``logs/<name>.log``."""
        with self.log_path(name).open("ab") as log:
            process = subprocess.Popen(
                list(map(str, args)), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})}, cwd=str(cwd or self.root), start_new_session=True,
            )
        self.processes.append((name, process))
        return process

    def _check_running(self, name: str, process: subprocess.Popen) -> None:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{self.log_tail(name)}")

    # -------------------------------------------------------------- Flower processes
    def start_superlink(self, *, simulation: bool, env: Optional[Mapping[str, str]] = None,
                        name: str = "superlink", timeout: float = 60.0) -> str:
        """Start a SuperLink (one HTTP port: Fleet, Control and Runtime APIs); its address."""
        port = self.port()
        args = [BIN / "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(port)]
        if simulation:
            args.append("--simulation")
        process = self.start(name, args, env=env)
        deadline = time.monotonic() + timeout
        while True:
            self._check_running(name, process)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy after {timeout}s:\n{self.log_tail(name)}")
            time.sleep(0.2)
        return f"127.0.0.1:{port}"

    def start_supernode(self, superlink: str, node_config: Mapping[str, Any],
                        env: Optional[Mapping[str, str]] = None, name: Optional[str] = None) -> subprocess.Popen:
        """Start a SuperNode connected to ``superlink`` with the given ``--node-config``."""
        name = name or f"supernode-{len(self.processes)}"
        args = [BIN / "flower-supernode", "--insecure", "--superlink", superlink,
                "--host", "127.0.0.1", "--port", str(self.port()),
                "--node-config", config_arg(node_config)]
        return self.start(name, args, env=env)

    def start_ray_node(self, name: str, *, head_address: Optional[str] = None, num_cpus: int = 1,
                       env: Optional[Mapping[str, str]] = None, timeout: float = 120.0) -> str:
        """Start one Ray node (a raylet) on loopback with ``ray start --block``; the GCS address.

        Its Ray node id goes to ``ray_node_ids[name]``.

        Without ``head_address`` it is the head of a new cluster. Each node gets its own
        ``--temp-dir`` (under the harness's short temporary folder) and explicit free
        ports, so two nodes on one machine stand in for two machines. ``env`` is what the
        node's worker processes inherit (e.g. a node-local ``FEDTAN_STATE_DIR``).
        """
        temp_dir = self.ray_tmp / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        manager_port = self.port()
        args = [BIN / "ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats",
                f"--node-manager-port={manager_port}", f"--object-manager-port={self.port()}",
                f"--dashboard-agent-grpc-port={self.port()}", f"--dashboard-agent-listen-port={self.port()}",
                f"--metrics-export-port={self.port()}", f"--runtime-env-agent-port={self.port()}"]
        if head_address is None:
            gcs = f"127.0.0.1:{self.port()}"
            args += ["--head", f"--port={gcs.rsplit(':', 1)[1]}", "--include-dashboard=false",
                     f"--ray-client-server-port={self.port()}"]
        else:
            gcs = head_address
            args.append(f"--address={gcs}")
        before = set(self.ray_nodes(gcs)) if head_address is not None else set()
        process = self.start(name, args, env={"RAY_TMPDIR": str(temp_dir), **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            new = {node_id: port for node_id, port in self.ray_nodes(gcs).items() if node_id not in before}
            mine = [node_id for node_id, port in new.items() if port == manager_port]
            if mine:
                self.ray_node_ids[name] = mine[0]
                return gcs
            self._check_running(name, process)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray node {name} did not join {gcs} within {timeout}s:\n{self.log_tail(name)}")
            time.sleep(1.0)

    def ray_nodes(self, gcs: str) -> dict[str, int]:
        """{node id: node manager port} of the alive nodes of the cluster at ``gcs`` (empty
        if it does not answer yet)."""
        code = ("import json, ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps({n['NodeID']: n['NodeManagerPort'] for n in ray.nodes() if n['Alive']}))")
        result = subprocess.run([sys.executable, "-c", code, gcs], env=self.env, capture_output=True, text=True,
                                timeout=120, stdin=subprocess.DEVNULL)
        try:
            return {k: int(v) for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
        except (ValueError, IndexError):
            return {}

    def add_connection(self, name: str, address: str, *, default: bool = True) -> None:
        """Write ``[superlink.<name>] address=..., insecure=true`` into config.toml."""
        self.connections[name] = address
        if default or self.default_connection is None:
            self.default_connection = name
        lines = ["[superlink]", f'default = "{self.default_connection}"', ""]
        for conn, addr in self.connections.items():
            lines += [f"[superlink.{conn}]", f'address = "{addr}"', "insecure = true", ""]
        (self.home / "config.toml").write_text("\n".join(lines))

    # -------------------------------------------------------------- flwr CLI
    def flwr(self, *args: str, timeout: float = 60.0, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Run ``flwr <args>`` to completion (killed after ``timeout``)."""
        return subprocess.run(
            [str(BIN / "flwr"), *map(str, args)], env=self.env, cwd=str(cwd or self.root),
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def flwr_json(self, *args: str, timeout: float = 60.0) -> dict:
        result = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"flwr {' '.join(args)} gave no JSON (exit {result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}") from None

    def wait_for_nodes(self, count: int, connection: Optional[str] = None, timeout: float = 90.0) -> list[str]:
        """Wait until ``count`` SuperNodes are online at the SuperLink; their node ids."""
        connection = connection or self.default_connection
        deadline = time.monotonic() + timeout
        while True:
            for name, process in self.processes:
                self._check_running(name, process)
            listing = self.flwr_json("supernode", "ls", connection)
            online = [n["node-id"] for n in listing.get("nodes", []) if n.get("status") == "online"]
            if len(online) >= count:
                return online
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(online)} of {count} SuperNodes online after {timeout}s: {listing}")
            time.sleep(0.5)

    def run_status(self, run_id: int, connection: Optional[str] = None) -> dict:
        connection = connection or self.default_connection
        listing = self.flwr_json("ls", connection, "--run-id", str(run_id))
        runs = listing.get("runs") or []
        if not runs:
            raise RuntimeError(f"flwr ls knows no run {run_id}: {listing}")
        return runs[0]

    def run_app(self, app: Path, *, connection: Optional[str] = None, run_config: Optional[Mapping[str, Any]] = None,
                federation_config: Optional[Mapping[str, Any]] = None, timeout: float = 150.0,
                name: str = "flwr-run") -> RunOutcome:
        """``flwr run <app> [connection] --stream`` and the run's final status from ``flwr ls``.

        ``flwr run --stream`` exits with 0 whether the run completed or failed, so the
        status comes from ``flwr ls --run-id``. On timeout the run is stopped
        (``flwr stop``) and ``TimeoutError`` raised with the streamed log.
        """
        args = [BIN / "flwr", "run", app]
        if connection:
            args.append(connection)
        args.append("--stream")
        if run_config:
            args += ["--run-config", config_arg(run_config)]
        if federation_config:
            args += ["--federation-config", config_arg(federation_config)]
        started = time.monotonic()
        process = self.start(name, args, cwd=Path(app))
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run_id = self._run_id(name)
            if run_id is not None:
                self.flwr("stop", str(run_id), *( [connection] if connection else []), timeout=30)
            raise TimeoutError(f"flwr run did not finish within {timeout}s:\n{self.log_tail(name, 120)}") from None
        wall = time.monotonic() - started
        output = self.log_path(name).read_text(errors="replace")
        run_id = self._run_id(name)
        if run_id is None:
            raise RuntimeError(f"flwr run started no run (exit {process.returncode}):\n{output[-6000:]}")
        deadline = time.monotonic() + 60
        while True:  # --stream normally returns after the run finished; be sure
            listing = self.run_status(run_id, connection)
            if str(listing.get("status", "")).startswith("finished") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return RunOutcome(run_id=run_id, status=str(listing.get("status")), details=str(listing.get("status-details")),
                          wall_seconds=wall, output=output, listing=listing)

    def _run_id(self, name: str) -> Optional[int]:
        match = _RUN_ID.search(self.log_path(name).read_text(errors="replace"))
        return int(match.group(1)) if match else None

    # -------------------------------------------------------------- teardown
    def stop(self, grace: float = GRACE_SECONDS) -> list[str]:
        """Stop every process started here and everything they started; what needed SIGKILL.

        Order: SuperNodes and CLI processes before the SuperLink (reverse start order).
        """
        killed: list[str] = []
        for name, process in reversed(self.processes):
            if process.poll() is not None:
                continue
            group = related_processes([process.pid], None)
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            _signal_pids({p: t for p, t in group.items() if p != process.pid}, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                killed.append(name)
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=grace)
        # Whatever is left (SuperExecs, flwr-clientapp/simulation processes, Ray services):
        # first a grace period to exit on their own (they watch their parent), then TERM, KILL.
        leftover = related_processes([], self.token)
        deadline = time.monotonic() + grace
        while leftover and time.monotonic() < deadline:
            time.sleep(0.2)
            leftover = _alive(leftover)
        if leftover:
            _signal_pids(leftover, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while leftover and time.monotonic() < deadline:
                time.sleep(0.2)
                leftover = _alive(leftover)
        if leftover:
            killed += [f"pid {pid}" for pid in leftover]
            _signal_pids(leftover, signal.SIGKILL)
            deadline = time.monotonic() + grace
            while leftover and time.monotonic() < deadline:
                time.sleep(0.1)
                leftover = _alive(leftover)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return killed

    def remaining(self) -> dict[int, int]:
        """Processes of this harness still alive (for asserting a clean teardown)."""
        return related_processes([p.pid for _, p in self.processes if p.poll() is None], self.token)


# ---------------------------------------------------------------------- one-call runner
_session: Optional[FlowerProcesses] = None
_session_env: dict[str, str] = {}


def _exit_on_sigterm() -> None:
    """Make SIGTERM exit normally, so ``atexit`` stops the processes (a runner killed with
    ``kill`` would otherwise leave its SuperLink and Ray behind)."""
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _simulation_session(env: Optional[Mapping[str, str]]) -> FlowerProcesses:
    """The process-wide simulation SuperLink (restarted if ``env`` changes); stopped at exit."""
    global _session, _session_env
    wanted = dict(env or {})
    if _session is not None and wanted != _session_env:
        _session.stop()
        _session = None
    if _session is None:
        session = FlowerProcesses(Path(tempfile.mkdtemp(prefix="fedtan-flwr-")), env=wanted)
        atexit.register(session.stop)
        _exit_on_sigterm()
        session.add_connection("simulation", session.start_superlink(simulation=True, env=wanted))
        _session, _session_env = session, wanted
    return _session


def run_app(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    *,
    num_cpus_per_client: float = 2.0,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 3600.0,
) -> dict:
    """Run this app once in Flower's Ray simulation and return its JSON summary.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        ``--run-config`` overrides (keys declared in pyproject.toml). Without a
        ``results-file`` the summary goes to a temporary file.
    num_supernodes : int
        Simulated nodes.
    num_cpus_per_client : float
        Ray CPUs per ClientApp: 2 on a 2-core machine gives one Ray actor.
    env : Optional[Mapping[str, str]]
        Extra environment for the SuperLink (and so the ClientApps), e.g.
        ``{"FEDTAN_MAX_LIVE_ROUNDS": "0"}``.
    timeout : float
        Seconds before the run is stopped and ``TimeoutError`` raised.
    """
    session = _simulation_session(env)
    config = dict(run_config)
    results = Path(str(config.get("results-file") or session.root / f"run-{uuid.uuid4().hex}.json"))
    config["results-file"] = str(results)
    cpus = int(num_cpus_per_client) if float(num_cpus_per_client).is_integer() else num_cpus_per_client
    outcome = session.run_app(
        PROJECT_ROOT, connection="simulation", run_config=config,
        federation_config={"num-supernodes": int(num_supernodes), "client-resources-num-cpus": cpus},
        timeout=timeout, name=f"flwr-run-{uuid.uuid4().hex[:8]}",
    )
    if outcome.status != "finished:completed" or not results.exists():
        raise RuntimeError(
            f"run {outcome.run_id} ended {outcome.status} ({outcome.details}):\n{outcome.output[-4000:]}"
        )
    summary = json.loads(results.read_text())
    summary["wall-seconds"] = outcome.wall_seconds
    return summary
