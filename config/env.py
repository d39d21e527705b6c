"""Typed readers for settings that come from the environment.

Every reader fails loudly with ImproperlyConfigured naming the variable, the value it got and
what would be accepted, so a typo in a deployment stops the process at start instead of
surfacing as a strange runtime behaviour hours later.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from django.core.exceptions import ImproperlyConfigured

from config.numbers import is_ascii_int, parse_ascii_int

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def env_str(name: str, default: str) -> str:
    value = _raw(name)
    return default if value is None or value == "" else value


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean: use 1/0, true/false, yes/no or on/off.")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = parse_ascii_int(value, what="", signed=True)  # int() also reads '٤', '1_6' and '+4'
    except ValueError:
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a whole number: set it to e.g. {default} (the digits 0-9 only)."
        ) from None
    _check_range(name, number, minimum, maximum)
    return number


def env_float(name: str, default: float, *, minimum: float | None = None, maximum: float | None = None) -> float:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        if not value.isascii():  # float() also reads Arabic-Indic and full-width digits
            raise ValueError(value)
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a number: set it to e.g. {default} (the digits 0-9 only)."
        ) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ImproperlyConfigured(f"{name}={value!r} must be a finite number.")
    _check_range(name, number, minimum, maximum)
    return number


def _check_range(name: str, number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}={number} is too small: it must be at least {minimum}.")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}={number} is too large: it must be at most {maximum}.")


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default).lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}.")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None or value == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_path(name: str, default: Path, *, base: Path) -> Path:
    value = _raw(name)
    path = Path(value).expanduser() if value else default
    if not path.is_absolute():
        path = base / path
    return path.resolve()


HOST_ID_FILE = "host_id"
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def env_host_id(name: str, *, data_dir: Path) -> str:
    """The stable id of this machine in the cluster: the variable, or an id made once and kept in
    `data_dir` (the host name when first started, plus a random suffix).

    Why not the host name: a container gets a new one on every restart, and two machines may
    share one. Why not /etc/machine-id: images copy it into every container made from them, and
    many containers have none. A file in DATA_DIR survives restarts wherever DATA_DIR is kept
    (a volume), and is this machine's alone as long as DATA_DIR is not shared between machines.
    """
    value = _raw(name)
    if value:
        if not _HOST_ID.fullmatch(value):
            raise ImproperlyConfigured(
                f"{name}={value!r} is not a host id: use 1-64 letters, digits, '.', '_' or '-' "
                "(starting with a letter or digit), the same on every restart of this machine."
            )
        return value
    path = data_dir / HOST_ID_FILE
    if not path.exists():
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-._")[:40] or "host"
        # Written aside, then linked into place: the monitor and the workers start at once, and
        # none of them may read a half-written file or replace the id another one just made.
        draft = path.with_name(f".{HOST_ID_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        draft.write_text(f"{stem}-{secrets.token_hex(3)}\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    stored = path.read_text().strip()
    if not _HOST_ID.fullmatch(stored):
        raise ImproperlyConfigured(
            f"{path} holds {stored!r}, which is not a host id: delete the file (a new one is made) or set {name}."
        )
    return stored


# libpq's settings for a network that fails silently (a host gone, a cable pulled, a firewall that
# drops instead of refusing): without them a connect waits out the SYN retries (about 2 minutes), a
# query sent into the void waits for TCP's retransmissions to give up (about 15 minutes) and a
# reply that never comes is waited for forever. With them each ends in an error within about a
# minute, which every caller already treats as a database restart. DATABASE_URL's query string
# overrides any of them (?keepalives=0 turns the probes off).
POSTGRES_NETWORK_DEFAULTS = {
    "connect_timeout": "10",  # seconds
    "keepalives": "1",
    "keepalives_idle": "30",  # seconds of silence before the first probe
    "keepalives_interval": "10",
    "keepalives_count": "3",  # unanswered probes before the connection is dead
    "tcp_user_timeout": "60000",  # milliseconds data sent may stay unacknowledged
}


# redis-py's settings for the same (it waits forever by default): every Redis connection of the
# project, rq's and django-rq's (its dashboard, /metrics) too, is made from REDIS_URL through
# redis_url_with_defaults. A value in REDIS_URL's query string wins.
REDIS_NETWORK_DEFAULTS = {
    "socket_connect_timeout": "3",  # seconds
    "socket_timeout": "10",  # seconds for any reply (workers block on their queues for 1 s at a time)
    "health_check_interval": "15",  # a connection idle this long is checked (PING) before its next use
}


def redis_url_with_defaults(url: str) -> str:
    """REDIS_URL with REDIS_NETWORK_DEFAULTS added to its query string where it sets none of them."""
    base, _, query = url.partition("?")  # not urlunsplit: it turns unix:///path into unix:/path
    given = parse_qs(query)  # a blank value is no value, to redis-py too
    added = urlencode({key: value for key, value in REDIS_NETWORK_DEFAULTS.items() if key not in given})
    joined = "&".join(part for part in (query, added) if part)
    return f"{base}?{joined}" if joined else base


def database_from_url(url: str, *, base: Path) -> dict[str, Any]:
    """Turn DATABASE_URL into a Django DATABASES entry (SQLite or PostgreSQL)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        # sqlite:///relative/or/absolute.sqlite3: the path is everything after "sqlite://".
        raw_path = unquote(url[len("sqlite://") :])
        if raw_path in ("", "/"):
            raise ImproperlyConfigured(
                f"DATABASE_URL={url!r} names no file: use sqlite:///var/db.sqlite3 (relative) "
                "or sqlite:////srv/app/db.sqlite3 (absolute)."
            )
        path = Path(raw_path[1:]) if raw_path.startswith("//") else base / raw_path.lstrip("/")
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(path),
            # Workers, the monitor and the web server write at once: WAL lets readers go on
            # while one writes, IMMEDIATE takes the write lock at BEGIN so two writers queue
            # instead of failing with "database is locked" halfway through a transaction.
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            "TEST": {"NAME": str(path.with_name(path.stem + "-test" + path.suffix))},
        }
    if scheme in ("postgres", "postgresql", "pgsql"):
        name = unquote(parts.path.lstrip("/"))
        if not name:
            raise ImproperlyConfigured(
                f"DATABASE_URL={url!r} names no database: use postgresql://USER@HOST:5432/DBNAME."
            )
        given = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        options = {**POSTGRES_NETWORK_DEFAULTS, **given}
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "OPTIONS": options,
            # Workers touch the database every second: keep their connection (checked before
            # reuse) instead of opening a new PostgreSQL backend each time.
            "CONN_MAX_AGE": 60,
            "CONN_HEALTH_CHECKS": True,
        }
    raise ImproperlyConfigured(
        f"DATABASE_URL has the unsupported scheme {scheme!r}: use sqlite:///PATH or postgresql://USER@HOST/DB."
    )


def env_call_sizes(name: str, default: list[int]) -> list[int]:
    """A comma-separated list of pipeline call sizes ('1,4'), each a whole number from 1 to 1024."""
    raw = _raw(name)
    if raw is None:
        return default
    sizes = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        if not is_ascii_int(item) or not 1 <= parse_ascii_int(item, what="") <= 1024:
            raise ImproperlyConfigured(
                f"{name}={raw!r}: {item!r} is not a call size; use whole numbers from 1 to 1024, comma separated "
                "(e.g. '1,4'), or an empty value for none."
            )
        sizes.append(parse_ascii_int(item, what=""))
    return sorted(set(sizes))


def parse_simulated_spec(spec: str) -> list[tuple[str, float]]:
    """Parse GPU_SIMULATED (``NAME[:SPEED][*COUNT]``, comma separated) into (name, speed) pairs.

    ``H100*2,T4:0.25`` gives [("H100", 1.0), ("H100", 1.0), ("T4", 0.25)].
    """
    devices: list[tuple[str, float]] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        count = 1
        if "*" in item:
            item, _, count_text = item.partition("*")
            # isdigit() alone let '²' through to int(), which raised a bare ValueError.
            count = parse_ascii_int(count_text, what="") if is_ascii_int(count_text) else 0
            if not 1 <= count <= 64:
                raise ImproperlyConfigured(
                    f"GPU_SIMULATED item {raw.strip()!r}: the count after '*' must be a whole number from 1 to 64."
                )
        speed = 1.0
        if ":" in item:
            item, _, speed_text = item.partition(":")
            try:
                speed = float(speed_text) if speed_text.isascii() else -1.0
            except ValueError:
                speed = -1.0
            if not 0.01 <= speed <= 100:
                raise ImproperlyConfigured(
                    f"GPU_SIMULATED item {raw.strip()!r}: the speed after ':' must be a number from 0.01 to 100."
                )
        name = item.strip()
        if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or len(name) > 32:
            raise ImproperlyConfigured(
                f"GPU_SIMULATED item {raw.strip()!r}: the name must be 1-32 letters, digits, '-', '_' or '.'."
            )
        devices.extend((name, speed) for _ in range(count))
    if not devices:
        raise ImproperlyConfigured("GPU_SIMULATED describes no device: use e.g. 'H100*2,T4:0.25'.")
    if len(devices) > 64:
        raise ImproperlyConfigured(f"GPU_SIMULATED describes {len(devices)} devices; at most 64 are supported.")
    return devices
