"""How long a PostgreSQL client waits once its network goes silent, with the project's libpq
settings (config/env.py POSTGRES_NETWORK_DEFAULTS) and without them.

    sudo .venv/bin/python bench/bench_db_network.py [--give-up 150]

A silent network (a host gone, a cable pulled, a firewall that drops instead of refusing) sends
no reset: without keepalives and a TCP user timeout, a connection waits for a reply forever.
This run needs root and iproute2: it adds a private address (10.99.99.1) to the loopback device,
forwards it to the PostgreSQL of DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/postgres)
through a small proxy, opens connections to it, then removes the address and routes it into a
blackhole, so that every packet to it is dropped without a word. Three cases, each with and
without the settings: a query waiting for its reply when the network goes, a query sent after,
and a new connection (to a listener whose full backlog drops every SYN, as a silent
network does: a blackhole route refuses a local connect at once). It waits at most --give-up
seconds for each and leaves the routes as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config.env import POSTGRES_NETWORK_DEFAULTS

ADDRESS = "10.99.99.1"
CUT_AT = [0.0]  # when the network went
STUCK = [0]  # the port of a listener that answers no SYN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--give-up", type=float, default=150.0, help="Longest wait for each case, in seconds.")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise SystemExit("this run changes the loopback device's addresses and routes: run it as root, with iproute2")
    url = urlsplit(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    if not url.scheme.startswith(("postgres", "pgsql")):
        raise SystemExit("DATABASE_URL names no PostgreSQL server: set it to one (postgresql://USER@HOST:PORT/DB)")
    server = (url.hostname or "127.0.0.1", url.port or 5432)
    login = {"user": url.username or "postgres", "password": url.password or "", "dbname": url.path.lstrip("/")}

    subprocess.run(["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True)
    results: dict[tuple[str, str], str] = {}
    stuck: list[socket.socket] = []
    try:
        threading.Thread(target=proxy, args=(server,), daemon=True).start()
        stuck.extend(stuck_listener())
        time.sleep(0.3)
        cut = threading.Event()
        cases = []
        for label, options in (("project defaults", POSTGRES_NETWORK_DEFAULTS), ("libpq's own", {})):
            for case in ("waiting for a reply", "query sent after", "new connection"):
                cases.append(threading.Thread(target=run_case, args=(case, label, options, login, cut, results)))
        for thread in cases:
            thread.start()
        time.sleep(2)  # every connection is open, and the long queries are waiting
        subprocess.run(["ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo"], check=True)
        subprocess.run(["ip", "route", "add", "blackhole", f"{ADDRESS}/32"], check=True)
        CUT_AT[0] = time.monotonic()
        cut.set()
        started = time.monotonic()
        for thread in cases:
            thread.join(timeout=max(0.0, args.give_up - (time.monotonic() - started)))
    finally:
        for sock in stuck:
            sock.close()
        subprocess.run(["ip", "route", "del", "blackhole", f"{ADDRESS}/32"], check=False, capture_output=True)
        subprocess.run(["ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo"], check=False, capture_output=True)

    rows = [("case", "project defaults", "libpq's own (the baseline)")]
    for case in ("waiting for a reply", "query sent after", "new connection"):
        rows.append(
            (
                case,
                *(
                    results.get((case, label), f"waiting after {args.give_up:.0f} s")
                    for label in (rows[0][1], "libpq's own")
                ),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for n, row in enumerate(rows):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * width for width in widths))
    print(f"settings: {', '.join(f'{k}={v}' for k, v in POSTGRES_NETWORK_DEFAULTS.items())}")


def run_case(
    case: str, label: str, options: dict[str, str], login: dict[str, str], cut: threading.Event, results: dict
) -> None:
    import psycopg

    def connect() -> psycopg.Connection:
        return psycopg.connect(host=ADDRESS, port=5432, autocommit=True, **login, **options)

    def timed(work: Callable[[], object], since: Callable[[], float]) -> None:
        try:
            work()
            results[(case, label)] = f"answered after {time.monotonic() - since():.0f} s"
        except Exception as error:  # any error ends the wait: that is what is timed
            results[(case, label)] = f"error after {time.monotonic() - since():.0f} s ({type(error).__name__})"

    if case == "waiting for a reply":  # sent before the network goes, timed from when it went
        conn = connect()
        timed(lambda: conn.execute("SELECT pg_sleep(600)"), lambda: CUT_AT[0])
        return
    conn = connect() if case == "query sent after" else None
    cut.wait()
    time.sleep(1)  # the network is gone
    started = time.monotonic()
    if conn is not None:
        timed(lambda: conn.execute("SELECT 1"), lambda: started)
    else:  # to a server whose SYNs go unanswered (STUCK: its backlog is full)
        address = {"host": "127.0.0.1", "port": STUCK[0], **login, **options}
        timed(lambda: psycopg.connect(**address).close(), lambda: started)


def stuck_listener() -> list[socket.socket]:
    """A listener whose backlog is full, so that the kernel drops every further SYN to it: what
    a connect to a host behind a silent network meets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    STUCK[0] = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # it completes in the backlog, never accepted
            filler.connect(("127.0.0.1", STUCK[0]))
        fillers.append(filler)
    time.sleep(0.2)
    return [listener, *fillers]


def proxy(server: tuple[str, int]) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((ADDRESS, 5432))
    listener.listen(32)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(server)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(source, sink), daemon=True).start()


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass


if __name__ == "__main__":
    main()
