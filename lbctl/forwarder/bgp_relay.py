"""The program ExaBGP runs as its API process (`process lbctl { run … }`): it connects to the
forwarder's Unix socket and copies lines both ways — ExaBGP's JSON events and command
acknowledgements to the forwarder, the forwarder's announce/withdraw commands to ExaBGP.

When either side goes away it exits; ExaBGP runs with exabgp.api.terminate=true, so it then shuts
its sessions down too (a forwarder killed with -9 takes its routes with it)."""

from __future__ import annotations

import os
import socket
import sys
import threading


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m lbctl.forwarder.bgp_relay SOCKET", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(argv[0])
    except OSError as exc:
        print(f"bgp relay: cannot reach the forwarder at {argv[0]}: {exc}", file=sys.stderr)
        return 1

    def to_exabgp() -> None:
        with sock.makefile("rb") as commands:
            for line in commands:
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()
        os._exit(0)  # the forwarder is gone

    threading.Thread(target=to_exabgp, daemon=True).start()
    for line in sys.stdin:  # events and acknowledgements from ExaBGP
        sock.sendall(line.encode())
    os._exit(0)  # ExaBGP is gone


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
