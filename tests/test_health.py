"""/healthz and /readyz: no login, no data, the failing part named, never a 500; LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import OperationalError, connection
from django.db.migrations.recorder import MigrationRecorder

from config import health
from config.logging_format import JsonFormatter
from gpuscheduler import queues
from tests.processes import settings_in_a_fresh_process

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def redis_down(settings):
    """REDIS_URL pointed at a port nothing listens on, with the cached connection dropped both ways."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    queues._connection.cache_clear()
    yield
    queues._connection.cache_clear()


def test_healthz_answers_200_without_login_or_database(client):
    # No django_db mark: any database access here would raise instead of answering.
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-cache" in response["Cache-Control"]


def test_healthz_answers_even_when_redis_is_down(client, redis_down):
    assert client.get("/healthz").status_code == 200


@pytest.mark.django_db
def test_readyz_is_ready_when_database_redis_and_migrations_are(client, redis_db):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": {"status": "ok"}, "redis": {"status": "ok"}, "migrations": {"status": "ok"}},
    }


@pytest.mark.django_db
def test_readyz_names_redis_when_redis_is_down(client, redis_down, settings):
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["failing"] == ["redis"]
    assert body["checks"]["redis"]["status"] == "failing"
    assert body["checks"]["redis"]["reason"].startswith("Redis does not answer (")
    assert body["checks"]["database"] == {"status": "ok"}
    assert settings.REDIS_URL.rsplit(":", 1)[1].split("/")[0] not in response.content.decode(), "no address leaks"


@pytest.mark.django_db
def test_readyz_names_a_migration_not_applied(client, redis_db):
    # The database forgets one migration (rolled back with the test): the code is ahead of it.
    MigrationRecorder.Migration.objects.filter(app="personas", name="0003_models_as_data").delete()
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["migrations"]
    assert "personas.0003_models_as_data" in body["checks"]["migrations"]["reason"]
    assert "manage.py migrate" in body["checks"]["migrations"]["reason"]


@pytest.mark.django_db
def test_readyz_names_the_database_when_it_does_not_answer(client, redis_db, monkeypatch):
    secret = "password authentication failed for user samples at db.internal"

    def refuse(*args, **kwargs):
        raise OperationalError(secret)

    monkeypatch.setattr(connection, "cursor", refuse)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["database", "migrations"]
    assert body["checks"]["database"] == {
        "status": "failing",
        "reason": "the database does not answer (OperationalError)",
    }
    assert body["checks"]["migrations"]["status"] == "unknown"
    assert body["checks"]["redis"] == {"status": "ok"}
    assert "db.internal" not in response.content.decode(), "the driver's message stays in the log"


@pytest.mark.django_db
def test_readyz_turns_any_unexpected_error_into_a_named_503(client, redis_db, monkeypatch):
    def broken() -> list[str]:
        raise RuntimeError("Traceback (most recent call last): secret")

    monkeypatch.setattr(health, "pending_migrations", broken)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["migrations"] == {
        "status": "failing",
        "reason": "the applied migrations cannot be read (RuntimeError)",
    }
    assert "Traceback" not in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_head_and_refuse_writes(client, redis_db, path):
    assert client.head(path).status_code == 200
    assert client.post(path).status_code == 405
    assert client.put(path).status_code == 405


# --- LOG_FORMAT ---------------------------------------------------------------------------------


def record(message: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("gpuscheduler.worker", logging.WARNING, __file__, 1, message, args, exc_info)


def test_a_json_record_is_one_line_with_time_level_logger_and_message():
    line = JsonFormatter().format(record("device %s is %s\nsecond line", "SIM 0 H100", "hot"))
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message"}
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "gpuscheduler.worker"
    assert entry["message"] == "device SIM 0 H100 is hot\nsecond line"
    assert entry["time"].endswith("+00:00")


def test_a_json_record_carries_the_exception_text():
    try:
        raise ValueError("bad reading")
    except ValueError:
        entry = json.loads(JsonFormatter().format(record("failed", exc_info=sys.exc_info())))
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].endswith("ValueError: bad reading")


def test_log_format_is_plain_by_default_and_json_on_request(tmp_path):
    values = "[s.LOG_FORMAT, s.LOGGING['handlers']['console']['formatter']]"
    plain = settings_in_a_fresh_process(tmp_path, values, unset=("LOG_FORMAT",))
    assert json.loads(plain.stdout) == ["plain", "plain"]
    chosen = settings_in_a_fresh_process(tmp_path, values, LOG_FORMAT="JSON")
    assert json.loads(chosen.stdout) == ["json", "json"]


def test_a_bad_log_format_stops_the_import_naming_the_choices(tmp_path):
    result = settings_in_a_fresh_process(tmp_path, "[s.LOG_FORMAT]", LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "ImproperlyConfigured: LOG_FORMAT='xml' is not one of plain, json." in result.stderr


def test_log_format_json_writes_every_log_line_as_json(tmp_path):
    code = (
        "import django, logging; django.setup(); log = logging.getLogger('personas.demo')\n"
        "log.info('queued %d image', 1)\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('it failed')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LOG_")},
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DATA_DIR": str(tmp_path),
            "LOG_FORMAT": "json",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(e["level"], e["logger"], e["message"]) for e in entries] == [
        ("INFO", "personas.demo", "queued 1 image"),
        ("ERROR", "personas.demo", "it failed"),
    ]
    assert "ZeroDivisionError: division by zero" in entries[1]["exception"]
