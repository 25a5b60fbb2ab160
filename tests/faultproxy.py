"""A TCP proxy on loopback that misbehaves on purpose: stall, reset, or forward (then maybe stall).

``FaultProxy(target_port)`` listens on ``127.0.0.1:port`` and handles each new connection by its ``mode``
at the moment the connection is accepted:

- ``"stall"``: accept, read and drop whatever the client sends, never answer (a hung server);
- ``"reset"``: accept and close at once with a TCP reset (``SO_LINGER`` 0);
- ``"forward"``: pipe bytes both ways to ``127.0.0.1:target_port``; with ``stall_after=N`` the answer stops
  after N bytes of it and the connection stays open (a server that hangs mid-transfer);
- ``"forbidden"``: answer every request with S3's ``403 AccessDenied`` error document.

Setting ``mode = "stall"`` also silences connections already open (kept-alive ones included): their next
answer is dropped.

A refused connection needs no proxy: :func:`closed_port`.

``reset_first=n`` resets the next n connections whatever the mode, then behaves as the mode says: a
transient fault that a retry gets past. ``connections`` counts the connections accepted.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


def closed_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    def __init__(self, target_port: int | None = None, mode: str = "forward", stall_after: int | None = None):
        self.target_port = target_port
        self.mode = mode
        self.stall_after = stall_after
        self.reset_first = 0
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- lifecycle
    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.close()
            self._open.clear()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- connections
    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._open.append(s)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue  # e.g. ECONNABORTED: a client reset the connection before it was accepted
            self.connections += 1
            self._track(client)
            mode = self.mode
            if self.reset_first > 0:
                self.reset_first -= 1
                mode = "reset"
            threading.Thread(target=self._handle, args=(client, mode), daemon=True).start()

    def _handle(self, client: socket.socket, mode: str) -> None:
        if mode == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        if mode == "stall":
            self._drain(client)
            return
        if mode == "forbidden":
            self._forbid(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        self._track(upstream)
        threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
        self._pipe(upstream, client, True)

    def _forbid(self, client: socket.socket) -> None:
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
            b"<Message>Access Denied</Message><RequestId>1</RequestId></Error>"
        )
        head = (
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
            b"x-amz-request-id: 1\r\n\r\n" % len(body)
        )
        buf = b""
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                data = client.recv(65536)
                if not data:
                    break
                buf += data
                while b"\r\n\r\n" in buf:  # one answer per request head (bodies are small or absent)
                    req, _, buf = buf.partition(b"\r\n\r\n")
                    length = 0
                    for line in req.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    while len(buf) < length:
                        more = client.recv(65536)
                        if not more:
                            return
                        buf += more
                    buf = buf[length:]
                    client.sendall(head + (b"" if req.startswith(b"HEAD") else body))

    def _drain(self, s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not self._stop.is_set() and s.recv(65536):
                pass

    def _pipe(self, src: socket.socket, dst: socket.socket, answer: bool) -> None:
        sent = 0
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if answer:  # the server's answer: cut it at stall_after bytes, or now once told to stall
                    limit = sent if self.mode == "stall" else self.stall_after
                    if limit is not None and sent + len(data) > limit:
                        dst.sendall(data[: max(limit - sent, 0)])
                        self._drain(src)  # keep the connection open and silent: a stall mid-answer
                        return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
