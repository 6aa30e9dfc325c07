"""A TCP proxy on loopback that can cut a connection path the way a network partition
does: while cut, no byte passes in either direction (connections hang rather than fail),
and new connections are accepted but get nothing through. Healing lets the held bytes
through. Runs in threads of the test process."""

from __future__ import annotations

import select
import socket
import threading


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.open = threading.Event()
        self.open.set()
        self.closing = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self.open.set()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        # A new connection during a cut waits, as a SYN into a partition would.
        while not self.open.wait(0.2):
            if self.closing.is_set():
                client.close()
                return
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        peers = {client: server, server: client}
        try:
            while not self.closing.is_set():
                if not self.open.wait(0.2):
                    continue  # held: nothing is read, so nothing passes
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self.closing.set()
        self.open.set()
        self.listener.close()
