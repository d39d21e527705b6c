"""A fault injector in front of PostgreSQL: a TCP proxy that lets a COMMIT through and cuts the
connection before the server's reply reaches the client.

That is what a network blip, a failover or a pooler resetting the connection does at the worst
moment: the database has applied the COMMIT, the worker gets an OperationalError and cannot
tell. Used by the fault tests and by bench/bench_faults.py; it speaks just enough of the
PostgreSQL wire protocol to find message boundaries, and refuses TLS so it can read them.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Any

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class PgCutProxy:
    """Listens on `host` (127.0.0.1):<port> and forwards to PostgreSQL at `upstream`; unarmed, it
    only forwards (bench/bench_db_network.py puts it on an address it can route into a blackhole).

    `arm(n)` cuts the next `n` COMMITs sent on connections that have inserted into `table_marker`
    (the worker's image commit): the COMMIT reaches the server, its reply is dropped and both
    sides are closed.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        table_marker: bytes = b'INSERT INTO "personas_sampleimage"',
        host: str = "127.0.0.1",
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.marker = table_marker
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._to_cut = 0
        self.cuts = 0
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="pgproxy-accept", daemon=True).start()

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def arm(self, cuts: int) -> None:
        with self._lock:
            self._to_cut = cuts

    def _take_cut(self) -> bool:
        with self._lock:
            if self._to_cut <= 0:
                return False
            self._to_cut -= 1
            self.cuts += 1
            return True

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    # --- plumbing -------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            link = _Link(self, client, server)
            threading.Thread(target=link.client_to_server, name="pgproxy-up", daemon=True).start()
            threading.Thread(target=link.server_to_client, name="pgproxy-down", daemon=True).start()


class _Link:
    def __init__(self, proxy: PgCutProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.dirty = False  # this session has written image rows in its open transaction
        self.cutting = threading.Event()
        self.reply_seen = threading.Event()

    def _close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def client_to_server(self) -> None:
        buffer = b""
        started = False
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                buffer += data
                while True:
                    message, buffer, kind = _next_message(buffer, started)
                    if message is None:
                        break
                    if kind == "ssl":
                        self.client.sendall(b"N")  # no TLS: the proxy must read the messages
                        continue
                    if kind == "startup":
                        started = True
                    if self._should_cut(kind, message):
                        self.cutting.set()  # before forwarding: the reply must not slip through
                        self.server.sendall(message)
                        self.reply_seen.wait(5)
                        self._close()
                        return
                    self.server.sendall(message)
        except OSError:
            pass
        self._close()

    def _should_cut(self, kind: str, message: bytes) -> bool:
        if kind in ("Q", "P") and self.proxy.marker in message:
            self.dirty = True
        if kind == "Q" and message[5:].lstrip().upper().startswith(b"COMMIT"):
            dirty, self.dirty = self.dirty, False
            return dirty and self.proxy._take_cut()
        if kind == "Q" and message[5:].lstrip().upper().startswith(b"ROLLBACK"):
            self.dirty = False
        return False

    def server_to_client(self) -> None:
        try:
            while True:
                data = self.server.recv(65536)
                if not data:
                    break
                if self.cutting.is_set():
                    self.reply_seen.set()  # the server answered the COMMIT: drop the answer
                    continue
                self.client.sendall(data)
        except OSError:
            pass
        self.reply_seen.set()
        self._close()


def _next_message(buffer: bytes, started: bool) -> tuple[Any, bytes, str]:
    """Split one protocol message off `buffer`: (message or None, rest, kind)."""
    if not started:
        if len(buffer) < 8:
            return None, buffer, ""
        (length,) = struct.unpack("!I", buffer[:4])
        if len(buffer) < length:
            return None, buffer, ""
        (code,) = struct.unpack("!I", buffer[4:8])
        kind = "ssl" if code in (SSL_REQUEST, GSSENC_REQUEST) else "startup"
        return buffer[:length], buffer[length:], kind
    if len(buffer) < 5:
        return None, buffer, ""
    (length,) = struct.unpack("!I", buffer[1:5])
    if len(buffer) < 1 + length:
        return None, buffer, ""
    return buffer[: 1 + length], buffer[1 + length :], chr(buffer[0])
