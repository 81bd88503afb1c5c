"""ggml's RPC backend: remote hosts as devices (`--rpc host:port,...`) and the server they run (`rpc-server`).

ggml's RPC client aborts the process when a host is unreachable or dies. Two guards keep the runner alive: each
endpoint is probed here (TCP connect and ggml's HELLO, with a timeout) before ggml connects, and an abort hook
(ggml/_ffi_build.py) parks the thread that hit a dead connection and records why, which `failure()` reads so the
engine can end its requests and report the error in /health.
"""
from __future__ import annotations

import re
import socket
import struct

from ggml._lib import ffi, lib

PROTO_MAJOR = 7  # RPC_PROTO_MAJOR_VERSION of the pinned ggml (ggml-rpc.h)
_CMD_HELLO = 14
_CAPS = 24  # RPC_CONN_CAPS_SIZE
PROBE_TIMEOUT_S = 5.0


class RpcError(Exception):
    """An RPC endpoint that is malformed, unreachable or not a compatible ggml rpc-server."""


def available() -> bool:
    """Whether this build has ggml's RPC backend."""
    return bool(lib.pyrunner_rpc_available())


def probe(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Connect and exchange ggml's HELLO; raises RpcError naming the endpoint when that fails."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
            s.sendall(bytes([_CMD_HELLO]) + struct.pack("<Q", _CAPS) + bytes(_CAPS))
            size = struct.unpack("<Q", _recv_exact(s, 8))[0]
            if size != 4 + _CAPS:
                raise RpcError(f"RPC endpoint {endpoint} answered HELLO with {size} bytes: not a compatible "
                               "ggml rpc-server")
            major, minor, patch = _recv_exact(s, size)[:3]
    except TimeoutError:
        raise RpcError(f"RPC endpoint {endpoint} did not answer HELLO within {timeout_s:g} s (ggml's rpc-server "
                       "serves one client at a time: is another runner connected to it?)") from None
    except OSError as e:
        raise RpcError(f"RPC endpoint {endpoint} is not reachable: {e}") from None
    if major != PROTO_MAJOR:
        raise RpcError(f"RPC endpoint {endpoint} speaks RPC protocol {major}.{minor}.{patch}; this build needs "
                       f"{PROTO_MAJOR}.x")


def accepts(endpoint: str, timeout_s: float = 1.0) -> bool:
    """Whether something still accepts TCP connections at `endpoint` (no HELLO: a busy server only queues it)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed during HELLO")
        data += chunk
    return data


def install_abort_hook() -> None:
    """From now on an RPC abort parks its thread and is reported by `failure()` instead of ending the process."""
    lib.pyrunner_install_abort_hook()


def failed() -> bool:
    """Cheap form of `failure() is not None`, for the paths that free ggml memory."""
    return bool(lib.pyrunner_rpc_failure(ffi.NULL, 0))


def failure() -> str | None:
    """ggml's message for a connection to an RPC host that failed, once one has (it never clears: the connection's
    thread is parked and the runner must be restarted)."""
    buf = ffi.new("char[]", 2048)
    if not lib.pyrunner_rpc_failure(buf, 2048):
        return None
    text = ffi.string(buf).decode(errors="replace").strip()
    return re.sub(r"^\S*ggml-rpc\.cpp:\d+: ", "", text)  # ggml prefixes its source file and line


def serve(host: str, port: int, threads: int, use_ref: bool, mem_bytes: int = 0) -> int:
    """Run ggml's RPC server on host:port with the CPU device (blocks; returns only when it cannot serve)."""
    if not available():
        raise RpcError("this build has no RPC backend (rebuild with GGML_RPC=ON)")
    if ":" in host:
        raise RpcError(f"invalid host {host!r}: ggml's RPC server takes an IPv4 address or a host name")
    return int(lib.pyrunner_rpc_serve(f"{host}:{port}".encode(), threads, use_ref, mem_bytes))
