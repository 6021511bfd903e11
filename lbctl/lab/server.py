"""The lab pods' server (IPv4 and IPv6): HTTP on one TCP port and an echo on one UDP port, both answering
"<name> <peer address>" so a client can tell which pod answered and whose address it saw; and,
with --echo, a TCP port that keeps each connection open and answers every line with
"<name> <line>" (long-lived flows, to see whether one is ever reset).

    python3 -m lbctl.lab.server --name pod-1 --tcp 8080 --udp 5353 [--echo 9000] [--greeting TEXT]
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


def answer(name: str, peer: str, greeting: str = "") -> bytes:
    lines = [greeting] if greeting else []
    lines.append(f"{name} {plain(peer)}")
    return ("\n".join(lines) + "\n").encode()


def plain(peer: str) -> str:
    """An IPv4 peer as it is written, not as the dual-stack socket saw it (::ffff:198.18.0.1)."""
    return peer.removeprefix("::ffff:") if "." in peer else peer


def _dual_stack(kind: int) -> socket.socket:
    """A socket on [::] that takes IPv4 too (IPV6_V6ONLY off, whatever the sysctl says)."""
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


def parse_answer(body: str) -> tuple[str, str]:
    """(pod name, peer address) from an answer."""
    name, _, peer = body.strip().splitlines()[-1].partition(" ")
    return name, peer


def _echo_lines(name: str, port: int) -> None:
    listener = _dual_stack(socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", port))
    listener.listen(128)

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                conn.sendall(f"{name} ".encode() + line)

    while True:
        conn, _peer = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def serve(name: str, tcp_port: int, udp_port: int | None, greeting: str, echo_port: int | None = None) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = answer(name, self.client_address[0], greeting)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6
        allow_reuse_address = True
        request_queue_size = 512

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    http = Server(("::", tcp_port), Handler)
    http.daemon_threads = True
    if udp_port is not None:
        udp = _dual_stack(socket.SOCK_DGRAM)
        udp.bind(("::", udp_port))

        def echo() -> None:
            while True:
                _data, peer = udp.recvfrom(2048)
                udp.sendto(answer(name, peer[0]), peer)

        threading.Thread(target=echo, daemon=True).start()
    if echo_port is not None:
        threading.Thread(target=_echo_lines, args=(name, echo_port), daemon=True).start()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=http.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"{name}: serving HTTP on :{tcp_port}" + (f", UDP echo on :{udp_port}" if udp_port else ""), flush=True)
    http.serve_forever(poll_interval=0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", type=int, default=8080)
    parser.add_argument("--udp", type=int, default=None)
    parser.add_argument("--echo", type=int, default=None, help="TCP line echo on this port")
    parser.add_argument("--greeting", default="")
    args = parser.parse_args(argv)
    serve(args.name, args.tcp, args.udp, args.greeting, args.echo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
