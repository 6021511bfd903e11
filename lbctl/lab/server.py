"""The lab pods' server: HTTP on one TCP port and an echo on one UDP port, both answering
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
    lines.append(f"{name} {peer}")
    return ("\n".join(lines) + "\n").encode()


def parse_answer(body: str) -> tuple[str, str]:
    """(pod name, peer address) from an answer."""
    name, _, peer = body.strip().splitlines()[-1].partition(" ")
    return name, peer


def _echo_lines(name: str, port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
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

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.request_queue_size = 512
    http = ThreadingHTTPServer(("0.0.0.0", tcp_port), Handler)
    http.daemon_threads = True
    if udp_port is not None:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", udp_port))

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
