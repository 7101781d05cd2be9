"""The node worker: a long-lived process on a deployed node that keeps its live rounds.

In deployment a SuperNode starts a fresh ``flwr-clientapp`` process for every message,
so nothing stays in memory between the ``2L + 1`` exchanges of a FedTAN round. The node
worker does: the ClientApp process forwards the message (with the node's state) over a
Unix socket, the worker runs the handler next to the node's paused round, client, model
and data, and sends back the reply and the node's new state; the ClientApp process
returns the reply to Flower as usual. Every statistic still travels as Flower messages
(TLS, SuperNode authentication and the SuperLink's accounting keep applying); the worker
is only the node's memory.

Operator's view
---------------
Nothing to do by default: the first ClientApp process that needs the worker starts it
(``python -m flwr_fedtan.runtime.worker serve``, in its own session, with the ClientApp's
interpreter and ``sys.path``). It listens on ``<private folder>/node-<digest>.sock``
(:mod:`.private`: ``$XDG_RUNTIME_DIR/flwr-fedtan`` or ``<tempdir>/flwr-fedtan-<uid>``,
mode 0700, ownership checked, and the worker accepts only peers of its own uid); the
digest covers the node id and the app's ``sys.path``, so each SuperNode and each
installed app version get their own worker. It exits after ``--idle-timeout`` seconds
without a message (default 600, ``FEDTAN_WORKER_IDLE_TIMEOUT``) or as soon as its
SuperNode process is gone, removing its socket; it starts nothing itself, so it leaves
no orphans. To run it yourself next to ``flower-supernode`` (e.g. under systemd)::

    python -m flwr_fedtan.runtime.worker serve --socket /run/user/$UID/flwr-fedtan/node.sock \
        --idle-timeout 0
    FEDTAN_NODE_WORKER_SOCKET=/run/user/$UID/flwr-fedtan/node.sock flower-supernode ...

``python -m flwr_fedtan.runtime.worker status`` lists the running workers (pid, messages
served, live rounds) and ``... stop [--socket PATH]`` stops them.

Faults
------
A worker that dies mid-round (killed, out of memory) is restarted by the next message,
which replays the round from the node's state and the node-local replay weights: same
result. An error inside the handler comes back as the ClientApp's error, with its text.

This module imports neither torch nor Ray (the worker process imports what the handler
needs).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import logging
import os
import pickle
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from .. import settings
from .framing import MAX_FRAME_BYTES, recv_frame as _recv, send_frames as _send
from .identity import in_flwr_clientapp_process, mark_home
from .private import private_folder

__all__ = ["MAX_FRAME_BYTES", "WorkerError", "call_worker", "serve", "socket_path", "worker_request"]

log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT = 600.0
START_TIMEOUT = 60.0
RECEIVE_TIMEOUT = 30.0  # a peer that connects and goes silent frees the worker after this


class WorkerError(RuntimeError):
    """The node worker could not be reached or failed to serve a message."""


def _dumps(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise WorkerError(
            f"cannot send this message to the node worker: {error}. The client_fn and handlers must be "
            "module-level functions (picklable by name), or use live_home='process'"
        ) from None



# ---------------------------------------------------------------------- where
def socket_path(node_id: int) -> Path:
    """The worker socket of a node: ``FEDTAN_NODE_WORKER_SOCKET``, else one per (node,
    app version) in the private folder."""
    configured = settings.worker_socket()
    if configured is not None:
        path = configured
        private_folder(path.parent)
        return path
    digest = hashlib.sha256(f"{node_id}\0{os.pathsep.join(sys.path)}".encode()).hexdigest()[:16]
    return private_folder() / f"node-{digest}.sock"


def _check_socket(path: Path) -> None:
    info = os.lstat(path)
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise WorkerError(f"{path} is not a socket of this user; remove it")


def _connect(path: Path, timeout: Optional[float]) -> socket.socket:
    _check_socket(path)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def _supernode_pid() -> Optional[int]:
    """The nearest ancestor running ``flower-supernode``, if any (Linux /proc)."""
    pid = os.getppid()
    for _ in range(16):
        if pid <= 1:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            stat_line = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if b"flower-supernode" in cmdline:
            return pid
        pid = int(stat_line[stat_line.rindex(")") + 2 :].split()[1])
    return None


def _watch_pid() -> int:
    supernode = _supernode_pid()
    if supernode is not None:
        return supernode
    return 0 if in_flwr_clientapp_process() else os.getpid()


def _start_worker(path: Path) -> None:
    idle = str(settings.worker_idle_timeout(DEFAULT_IDLE_TIMEOUT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    log_file = path.with_suffix(".log")
    with open(log_file, "ab") as out:
        os.chmod(log_file, 0o600)
        subprocess.Popen(
            [sys.executable, "-m", "flwr_fedtan.runtime.worker", "serve", "--socket", str(path),
             "--idle-timeout", idle, "--watch-pid", str(_watch_pid())],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, close_fds=True,
        )


def _connect_or_start(path: Path) -> socket.socket:
    try:
        return _connect(path, None)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    lock_path = path.with_suffix(".lock")
    with open(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; the others find its socket
        try:
            return _connect(path, None)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket of a worker that died
        _start_worker(path)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                return _connect(path, None)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"the node worker did not start within {START_TIMEOUT:g}s; see {path.with_suffix('.log')}"
                    ) from None
                time.sleep(0.02)


def worker_request(path: Path, kind: str, body: Any = None, *, start: bool = False,
                   timeout: Optional[float] = None) -> Any:
    """Send one request to the worker at ``path``; its answer (raises :class:`WorkerError`)."""
    conn = _connect_or_start(path) if start else _connect(path, timeout)
    with conn:
        _send(conn, _dumps((kind, list(sys.path))), _dumps(body))
        status, value = pickle.loads(_recv(conn))
    if status != "ok":
        raise WorkerError(value)
    return value


def call_worker(handler: Callable, msg: Any, context: Any, args: tuple) -> tuple[Any, Any]:
    """Run ``handler(msg, context, *args)`` in the node's worker; (reply, state).

    A worker that is gone (or dies while serving) is started again once; the node's round
    is then replayed from the node's state.
    """
    path = socket_path(context.node_id)
    body = (handler, msg, context, args)
    for attempt in range(2):
        try:
            return worker_request(path, "call", body, start=True)
        except (OSError, EOFError) as error:
            if attempt:
                raise WorkerError(f"the node worker at {path} failed twice: {error}; "
                                  f"see {path.with_suffix('.log')}") from None
            log.warning("FedTAN node worker at %s lost (%s); starting a new one, the round will be replayed",
                        path, error)
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------- the worker
def _peer_uid(conn: socket.socket) -> Optional[int]:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat_path = Path(f"/proc/{pid}/stat")
    if stat_path.exists():
        text = stat_path.read_text()
        return text[text.rindex(")") + 2] not in "ZX"
    return True


class _Worker:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.served = 0
        self.started = time.time()
        self.stopping = False

    def answer(self, header: bytes, body: bytes) -> tuple[str, Any]:
        try:
            kind, caller_path = pickle.loads(header)
            if kind == "call":
                # A worker started by the operator learns where the caller's app lives
                # (the SuperNode's installed app folder); entries it has win.
                sys.path.extend(entry for entry in caller_path if entry and entry not in sys.path)
                handler, msg, context, args = pickle.loads(body)
                reply = handler(msg, context, *args)
                self.served += 1
                from ..node import state as node_state  # the handler imported it already

                return "ok", (reply, node_state.records(context))
            if kind == "stats":
                from .live import live_rounds

                return "ok", {"pid": os.getpid(), "socket": str(self.path), "served": self.served,
                              **live_rounds().stats(), "uptime": time.time() - self.started}
            if kind == "stop":
                self.stopping = True
                return "ok", os.getpid()
            return "error", f"unknown request {kind!r}"
        except BaseException as error:  # noqa: BLE001 - everything goes back to the ClientApp
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-6:])
            print(trace, file=sys.stderr, flush=True)
            return "error", f"{type(error).__name__}: {error}"


def serve(path: Path, idle_timeout: float = DEFAULT_IDLE_TIMEOUT, watch_pid: int = 0,
          receive_timeout: float = RECEIVE_TIMEOUT) -> None:
    """Serve requests on ``path`` until idle for ``idle_timeout`` s (0: never) or until
    ``watch_pid`` (0: none) is gone, or SIGTERM. A connection whose request has not fully
    arrived within ``receive_timeout`` s, or whose frame header claims more than
    ``MAX_FRAME_BYTES``, is closed and the next one served."""
    from .live import live_rounds

    mark_home("worker")
    private_folder(path.parent)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    inode = os.lstat(path).st_ino
    listener.listen(16)
    listener.settimeout(1.0)
    worker = _Worker(path)
    print(f"FedTAN node worker pid {os.getpid()} on {path} (idle timeout {idle_timeout:g}s, "
          f"watching pid {watch_pid or 'none'})", flush=True)
    last = time.monotonic()
    try:
        while not worker.stopping:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if idle_timeout > 0 and time.monotonic() - last > idle_timeout:
                    print(f"idle for {idle_timeout:g}s: exiting", flush=True)
                    break
                if watch_pid and not _alive(watch_pid):
                    print(f"pid {watch_pid} is gone: exiting", flush=True)
                    break
                continue
            with conn:
                conn.settimeout(receive_timeout)
                uid = _peer_uid(conn)
                if uid is not None and uid != os.getuid():
                    print(f"refused a connection from uid {uid}", flush=True)
                    continue
                try:
                    header, body = _recv(conn), _recv(conn)
                except (OSError, EOFError, MemoryError) as error:  # socket.timeout is an OSError
                    print(f"dropped a connection: {type(error).__name__}: {error}", flush=True)
                    continue
                status, value = worker.answer(header, body)
                try:
                    payload = pickle.dumps((status, value), protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as error:  # noqa: BLE001
                    payload = pickle.dumps(("error", f"reply not picklable: {error}"))
                with contextlib.suppress(OSError):
                    _send(conn, payload)
            last = time.monotonic()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ino == inode:
                path.unlink()
        live_rounds().clear()


# ---------------------------------------------------------------------- command line
def _sockets(args: argparse.Namespace) -> list[Path]:
    if args.socket:
        return [Path(args.socket)]
    return sorted(private_folder().glob("*.sock"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flwr_fedtan.runtime.worker",
                                     description="FedTAN's node worker (keeps a deployed node's live rounds)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run a worker on a socket")
    p_serve.add_argument("--socket", required=True, help="socket path (its folder must be private, mode 0700)")
    p_serve.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                         help="exit after this many seconds without a message (0: never)")
    p_serve.add_argument("--watch-pid", type=int, default=0, help="exit when this process is gone (0: none)")
    p_serve.add_argument("--receive-timeout", type=float, default=RECEIVE_TIMEOUT,
                         help="seconds a connection may take to send its request")
    for name in ("status", "stop"):
        p = sub.add_parser(name, help=f"{name} the workers of this user (or one, with --socket)")
        p.add_argument("--socket", default=None)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(Path(args.socket), args.idle_timeout, args.watch_pid, args.receive_timeout)
        return 0
    out = io.StringIO()
    for path in _sockets(args):
        try:
            value = worker_request(path, "stats" if args.command == "status" else "stop", timeout=10)
        except (OSError, EOFError, WorkerError) as error:
            print(f"{path}: not answering ({error})", file=out)
            continue
        print(f"{path}: {value if args.command == 'status' else f'stopped pid {value}'}", file=out)
    print(out.getvalue() or "no workers", end="" if out.getvalue() else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
