"""Length-prefixed frames on a stream socket (the node worker's wire format).

Each frame is an 8-byte big-endian length and that many bytes. A receiver allocates as
the bytes arrive, not as the header claims, and refuses a header over
:data:`MAX_FRAME_BYTES`.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["MAX_FRAME_BYTES", "recv_frame", "send_frames"]

MAX_FRAME_BYTES = 1 << 34  # 16 GiB: a frame header claiming more is refused, not allocated
_CHUNK = 1 << 20
_HEADER = struct.Struct("!Q")


def send_frames(conn: socket.socket, *frames: bytes) -> None:
    conn.sendall(b"".join(_HEADER.pack(len(f)) + f for f in frames))


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    """``size`` bytes; memory grows with the bytes that arrive, not with the size claimed."""
    buffer = bytearray()
    while len(buffer) < size:
        chunk = conn.recv(min(_CHUNK, size - len(buffer)))
        if not chunk:
            raise EOFError("connection closed mid-frame")
        buffer += chunk
    return bytes(buffer)


def recv_frame(conn: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise EOFError(f"frame header claims {size} bytes, more than the {MAX_FRAME_BYTES} a frame may hold")
    return _recv_exact(conn, size)
