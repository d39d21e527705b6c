"""How long a PostgreSQL client waits once its network goes silent, with the project's libpq
settings (config/env.py POSTGRES_NETWORK_DEFAULTS) and without them.

    sudo .venv/bin/python bench/bench_db_network.py [--give-up 150]

A silent network (a host gone, a cable pulled, a firewall that drops instead of refusing) sends
no reset: without keepalives and a TCP user timeout, a connection waits for a reply forever.
This run needs root and iproute2: it adds a private address (10.99.99.1) to the loopback device,
forwards it to the PostgreSQL of DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/postgres)
through tests/pgproxy.py (unarmed: it only forwards), opens connections to it, then removes the
address and routes it into a blackhole, so that every packet to it is dropped without a word.
Three cases, each with and without the settings: a query waiting for its reply when the network
goes, a query sent after, and a new connection (to a listener whose full backlog drops every SYN,
as a silent network does: a blackhole route refuses a local connect at once). It waits at most
--give-up seconds for each and leaves the routes as they were.
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
from tests.pgproxy import PgCutProxy

ADDRESS = "10.99.99.1"
CUT_AT = [0.0]  # when the network went


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
    proxy: PgCutProxy | None = None
    stuck: list[socket.socket] = []
    try:
        proxy = PgCutProxy(server, host=ADDRESS)  # never armed: it only forwards
        stuck = stuck_listener()
        addresses = {"proxy": (ADDRESS, proxy.port), "stuck": ("127.0.0.1", stuck[0].getsockname()[1])}
        cut = threading.Event()
        cases = []
        for label, options in (("project defaults", POSTGRES_NETWORK_DEFAULTS), ("libpq's own", {})):
            for case in ("waiting for a reply", "query sent after", "new connection"):
                arguments = (case, label, {**login, **options}, addresses, cut, results)
                cases.append(threading.Thread(target=run_case, args=arguments))
        for thread in cases:
            thread.start()
        time.sleep(2)  # every connection is open, and the long queries are waiting
        subprocess.run(["ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo"], check=True)
        subprocess.run(["ip", "route", "add", "blackhole", f"{ADDRESS}/32"], check=True)
        CUT_AT[0] = time.monotonic()
        cut.set()
        for thread in cases:
            thread.join(timeout=max(0.0, args.give_up - (time.monotonic() - CUT_AT[0])))
    finally:
        if proxy is not None:
            proxy.close()
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
    case: str,
    label: str,
    options: dict[str, str],
    addresses: dict[str, tuple[str, int]],
    cut: threading.Event,
    results: dict,
) -> None:
    """One case: `options` are the login and libpq settings, `addresses` the proxy's and the stuck
    listener's; its outcome goes into `results`."""
    import psycopg

    def connect(to: str) -> psycopg.Connection:
        host, port = addresses[to]
        return psycopg.connect(host=host, port=port, autocommit=True, **options)

    def timed(work: Callable[[], object], since: Callable[[], float]) -> None:
        """`since` is read once the wait ended: the cut's time is not known before."""
        try:
            work()
            results[(case, label)] = f"answered after {time.monotonic() - since():.0f} s"
        except Exception as error:  # any error ends the wait: that is what is timed
            results[(case, label)] = f"error after {time.monotonic() - since():.0f} s ({type(error).__name__})"

    if case == "waiting for a reply":  # sent before the network goes, timed from when it went
        conn = connect("proxy")
        timed(lambda: conn.execute("SELECT pg_sleep(600)"), lambda: CUT_AT[0])
        return
    conn = connect("proxy") if case == "query sent after" else None
    cut.wait()
    time.sleep(1)  # the network is gone
    started = time.monotonic()
    if conn is not None:
        timed(lambda: conn.execute("SELECT 1"), lambda: started)
    else:  # to a server whose SYNs go unanswered
        timed(lambda: connect("stuck").close(), lambda: started)


def stuck_listener() -> list[socket.socket]:
    """A listener (first) whose backlog is full, so that the kernel drops every further SYN to it:
    what a connect to a host behind a silent network meets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # it completes in the backlog, never accepted
            filler.connect(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    return [listener, *fillers]


if __name__ == "__main__":
    main()
