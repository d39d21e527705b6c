"""Settings from the environment: typed readers that fail loudly, DATABASE_URL, and system checks."""

from __future__ import annotations

import json
import subprocess
from io import StringIO
from pathlib import Path

import pytest
from django.core.checks import Error, Warning, run_checks
from django.core.exceptions import ImproperlyConfigured

from config.env import (
    POSTGRES_NETWORK_DEFAULTS,
    database_from_url,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_path,
    env_str,
    redis_url_with_defaults,
)
from gpuscheduler.checks import check_settings
from personas.checks import check_samples_model
from tests.processes import settings_in_a_fresh_process

VAR = "PERSONA_TEST_SETTING"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(monkeypatch):
    """Set the test variable; unset by default."""
    monkeypatch.delenv(VAR, raising=False)

    def set_value(value: str) -> None:
        monkeypatch.setenv(VAR, value)

    return set_value


# --- typed readers ----------------------------------------------------------------------------


def test_unset_or_empty_variables_give_the_default(env):
    assert env_int(VAR, 7) == 7
    assert env_float(VAR, 1.5) == 1.5
    assert env_bool(VAR, True) is True
    assert env_str(VAR, "x") == "x"
    assert env_list(VAR, ["a"]) == ["a"]
    env("   ")
    assert env_int(VAR, 7) == 7
    assert env_float(VAR, 1.5) == 1.5
    assert env_str(VAR, "x") == "x"


def test_good_values_are_parsed_and_stripped(env):
    env(" 42 ")
    assert env_int(VAR, 7) == 42
    assert env_float(VAR, 1.5) == 42.0
    env("a, b,,c ")
    assert env_list(VAR, []) == ["a", "b", "c"]


@pytest.mark.parametrize("value", ["abc", "1.5", "1e3", "0x10", "ten"])
def test_a_bad_int_names_the_variable_and_the_value(env, value):
    env(value)
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}='{value}' is not a whole number: set it to e.g. 7"):
        env_int(VAR, 7)


def test_an_int_out_of_range_names_the_variable_and_the_limit(env):
    env("0")
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}=0 is too small: it must be at least 1"):
        env_int(VAR, 7, minimum=1)
    env("5000")
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}=5000 is too large: it must be at most 1024"):
        env_int(VAR, 7, minimum=1, maximum=1024)


@pytest.mark.parametrize("value", ["fast", "1,5", "--1"])
def test_a_bad_float_names_the_variable(env, value):
    env(value)
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}='{value}' is not a number"):
        env_float(VAR, 2.0)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_must_be_finite(env, value):
    env(value)
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}='{value}' must be a finite number"):
        env_float(VAR, 2.0, minimum=0, maximum=10)


def test_a_float_out_of_range_is_refused(env):
    env("0.01")
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}=0.01 is too small: it must be at least 0.1"):
        env_float(VAR, 2.0, minimum=0.1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_booleans_accept_the_usual_spellings(env, value, expected):
    env(value)
    assert env_bool(VAR, not expected) is expected


@pytest.mark.parametrize("value", ["maybe", "2", "y", "enabled"])
def test_a_bad_boolean_names_the_variable_and_the_accepted_values(env, value):
    env(value)
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}='{value}' is not a boolean: use 1/0, true/false"):
        env_bool(VAR, False)


def test_choices_are_case_insensitive_and_a_bad_one_lists_them(env):
    env("CPU")
    assert env_choice(VAR, "auto", ("auto", "cpu")) == "cpu"
    env("cuda")
    with pytest.raises(ImproperlyConfigured, match=f"{VAR}='cuda' is not one of auto, nvml, cpu, simulated"):
        env_choice(VAR, "auto", ("auto", "nvml", "cpu", "simulated"))


def test_paths_are_resolved_against_the_base(env, tmp_path):
    assert env_path(VAR, Path("var"), base=tmp_path) == (tmp_path / "var").resolve()
    env("data/here")
    assert env_path(VAR, Path("var"), base=tmp_path) == (tmp_path / "data" / "here").resolve()
    env("/srv/persona-data")
    assert env_path(VAR, Path("var"), base=tmp_path) == Path("/srv/persona-data")


# --- DATABASE_URL ---------------------------------------------------------------------------------


def test_a_relative_sqlite_url_is_relative_to_the_base():
    db = database_from_url("sqlite:///var/db.sqlite3", base=Path("/srv/app"))
    assert db["ENGINE"] == "django.db.backends.sqlite3"
    assert db["NAME"] == "/srv/app/var/db.sqlite3"
    assert db["TEST"]["NAME"] == "/srv/app/var/db-test.sqlite3"
    assert db["OPTIONS"]["transaction_mode"] == "IMMEDIATE"


def test_an_absolute_sqlite_url_keeps_its_path():
    db = database_from_url("sqlite:////data/persona/db.sqlite3", base=Path("/srv/app"))
    assert db["NAME"] == "/data/persona/db.sqlite3"


def test_a_sqlite_url_with_a_quoted_path_is_unquoted():
    assert database_from_url("sqlite:////data/my%20db.sqlite3", base=Path("/x"))["NAME"] == "/data/my db.sqlite3"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///"])
def test_a_sqlite_url_without_a_file_is_refused(url):
    with pytest.raises(ImproperlyConfigured, match=r"names no file: use sqlite:///var/db\.sqlite3"):
        database_from_url(url, base=Path("/srv/app"))


def test_a_postgresql_url_gives_every_connection_field():
    db = database_from_url(
        "postgresql://app:s%40cret@db.internal:5433/persona_samples?sslmode=require&connect_timeout=5",
        base=Path("/srv/app"),
    )
    assert db == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "persona_samples",
        "USER": "app",
        "PASSWORD": "s@cret",
        "HOST": "db.internal",
        "PORT": "5433",
        # The URL's options over the network defaults (its connect_timeout wins).
        "OPTIONS": {**POSTGRES_NETWORK_DEFAULTS, "sslmode": "require", "connect_timeout": "5"},
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
    }


def test_a_postgresql_connection_gives_up_on_a_silent_network_within_a_minute_by_default():
    # Keepalive probes after 30 s of silence, 3 of them 10 s apart; unacknowledged data at most
    # 60 s; a connect at most 10 s (bench/bench_db_network.py measures what they change).
    options = database_from_url("postgresql://app@db.internal/persona", base=Path("/"))["OPTIONS"]
    assert options == {
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
        "tcp_user_timeout": "60000",
    }
    assert (
        database_from_url("postgresql://app@db.internal/persona?keepalives=0", base=Path("/"))["OPTIONS"]["keepalives"]
        == "0"
    ), "the URL turns them off"


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "pgsql", "POSTGRESQL"])
def test_postgresql_scheme_spellings(scheme):
    db = database_from_url(f"{scheme}://postgres@127.0.0.1/persona", base=Path("/"))
    assert (db["ENGINE"], db["NAME"], db["USER"], db["PASSWORD"], db["PORT"]) == (
        "django.db.backends.postgresql",
        "persona",
        "postgres",
        "",
        "",
    )


def test_a_postgresql_url_without_a_database_is_refused():
    with pytest.raises(ImproperlyConfigured, match="names no database: use postgresql://USER@HOST:5432/DBNAME"):
        database_from_url("postgresql://postgres@127.0.0.1:5432/", base=Path("/"))


@pytest.mark.parametrize("url", ["mysql://root@localhost/db", "db.sqlite3", "http://example.com/db"])
def test_an_unsupported_database_scheme_is_refused(url):
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL has the unsupported scheme"):
        database_from_url(url, base=Path("/"))


# --- the settings module --------------------------------------------------------------------------


def https_settings_in_a_fresh_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The HTTPS-related settings and the time zone, as a fresh process reads them from `env`."""
    values = "[s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, getattr(s, 'SECURE_PROXY_SSL_HEADER', None), s.TIME_ZONE]"
    return settings_in_a_fresh_process(tmp_path, values, unset=("DJANGO_", "TIME_ZONE"), **env)


def test_plain_http_is_the_default(tmp_path):
    result = https_settings_in_a_fresh_process(tmp_path)
    assert json.loads(result.stdout) == [False, False, None, "UTC"]


def test_https_switches_make_cookies_secure_and_trust_the_proxy_header(tmp_path):
    result = https_settings_in_a_fresh_process(
        tmp_path, DJANGO_SECURE_COOKIES="1", DJANGO_BEHIND_PROXY="yes", TIME_ZONE="Europe/Berlin"
    )
    assert json.loads(result.stdout) == [True, True, ["HTTP_X_FORWARDED_PROTO", "https"], "Europe/Berlin"]


@pytest.mark.parametrize("name", ["DJANGO_SECURE_COOKIES", "DJANGO_BEHIND_PROXY"])
def test_a_bad_https_switch_stops_the_import_naming_the_variable(tmp_path, name):
    result = https_settings_in_a_fresh_process(tmp_path, **{name: "https"})
    assert result.returncode != 0
    assert f"ImproperlyConfigured: {name}='https' is not a boolean" in result.stderr


def login_settings_in_a_fresh_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The login throttling settings, as a fresh process reads them from `env`."""
    values = (
        "[s.AXES_FAILURE_LIMIT, s.AXES_COOLOFF_TIME.total_seconds(), s.AXES_LOCKOUT_PARAMETERS, "
        "s.AUTHENTICATION_BACKENDS[0], s.MIDDLEWARE[-1], s.BEHIND_PROXY]"
    )
    return settings_in_a_fresh_process(tmp_path, values, unset=("DJANGO_", "LOGIN_"), **env)


def test_logins_lock_after_five_failures_per_username_and_address_for_fifteen_minutes_by_default(tmp_path):
    result = login_settings_in_a_fresh_process(tmp_path)
    assert json.loads(result.stdout) == [
        5,
        900.0,
        [["username", "ip_address"]],
        "axes.backends.AxesStandaloneBackend",
        "axes.middleware.AxesMiddleware",
        False,
    ]


def test_the_login_limit_and_cool_off_come_from_the_environment(tmp_path):
    result = login_settings_in_a_fresh_process(
        tmp_path, LOGIN_FAILURE_LIMIT="10", LOGIN_COOLOFF_MINUTES="60", DJANGO_BEHIND_PROXY="1"
    )
    assert json.loads(result.stdout)[:2] == [10, 3600.0]
    assert json.loads(result.stdout)[-1] is True


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LOGIN_FAILURE_LIMIT", "0", "LOGIN_FAILURE_LIMIT=0 is too small: it must be at least 1"),
        ("LOGIN_FAILURE_LIMIT", "five", "LOGIN_FAILURE_LIMIT='five' is not a whole number"),
        ("LOGIN_FAILURE_LIMIT", "\u0665", "LOGIN_FAILURE_LIMIT='\u0665' is not a whole number"),
        ("LOGIN_COOLOFF_MINUTES", "0", "LOGIN_COOLOFF_MINUTES=0 is too small: it must be at least 1"),
        ("LOGIN_COOLOFF_MINUTES", "10081", "LOGIN_COOLOFF_MINUTES=10081 is too large: it must be at most 10080"),
        ("LOGIN_COOLOFF_MINUTES", "1.5", "LOGIN_COOLOFF_MINUTES='1.5' is not a whole number"),
    ],
)
def test_a_bad_login_throttling_setting_stops_the_import_naming_the_variable(tmp_path, name, value, message):
    result = login_settings_in_a_fresh_process(tmp_path, **{name: value})
    assert result.returncode != 0
    assert f"ImproperlyConfigured: {message}" in result.stderr


def test_django_axes_finds_its_backend_middleware_and_an_address_in_the_lockout_parameters():
    problems = [p for p in run_checks(include_deployment_checks=False) if p.id.startswith("axes.")]
    assert problems == []


# --- system checks ------------------------------------------------------------------------------


def ids(problems: list[Error | Warning]) -> list[str]:
    return [p.id for p in problems]


@pytest.fixture
def gpu(settings):
    def override(**options: object) -> None:
        settings.GPUSCHEDULER = {**settings.GPUSCHEDULER, **options}

    return override


@pytest.fixture
def samples(settings):
    def override(**options: object) -> None:
        settings.SAMPLES = {**settings.SAMPLES, **options}

    return override


def test_the_test_settings_pass_every_check():
    assert check_settings() == []
    assert check_samples_model() == []


def test_an_unknown_policy_is_error_e001(gpu):
    gpu(POLICY="fastest")
    (problem,) = check_settings()
    assert problem.id == "gpuscheduler.E001"
    assert isinstance(problem, Error)
    assert "GPU_POLICY='fastest'" in problem.msg
    assert "balanced, least_memory, round_robin" in problem.hint


def test_an_unknown_backend_is_error_e002(gpu):
    gpu(BACKEND="rocm")
    assert ids(check_settings()) == ["gpuscheduler.E002"]


def test_an_unknown_stealing_rule_is_error_e007(gpu):
    gpu(STEAL="sometimes")
    (problem,) = check_settings()
    assert problem.id == "gpuscheduler.E007"
    assert "GPU_STEAL='sometimes'" in problem.msg
    assert "speed, always" in problem.hint


@pytest.mark.parametrize("model", ["", "not a model!", "simulated:fast", "simulated:-1", "a/b/c", "owner/"])
def test_a_bad_samples_model_is_error_e003(samples, model):
    samples(MODEL=model)
    (problem,) = check_samples_model()
    assert problem.id == "gpuscheduler.E003"
    assert "SAMPLES_MODEL" in problem.msg
    assert "tiny" in problem.hint


@pytest.mark.parametrize("model", ["tiny", "simulated:0.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"])
def test_good_samples_models_pass(samples, model):
    samples(MODEL=model)
    assert check_samples_model() == []


@pytest.mark.parametrize(
    "model", ["/no/such/model/dir", "./no-such-model", "~/no-such-model-dir", " /srv/models/sd15 "]
)
def test_a_model_directory_missing_on_this_host_is_only_warning_w002(samples, model):
    samples(MODEL=model)
    (problem,) = check_samples_model()
    assert problem.id == "gpuscheduler.W002"
    assert isinstance(problem, Warning) and not isinstance(problem, Error)
    assert f"SAMPLES_MODEL={model.strip()!r} is not a diffusers directory on this host (testhost)" in problem.msg
    assert "GPU workers on this host will fail to load the model" in problem.hint


def test_a_directory_without_model_index_json_is_warning_w002(samples, tmp_path):
    samples(MODEL=str(tmp_path))
    assert ids(check_samples_model()) == ["gpuscheduler.W002"]
    (tmp_path / "model_index.json").write_text("{}")
    assert check_samples_model() == []


def test_a_web_host_without_the_model_still_passes_manage_py_check(samples):
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    samples(MODEL="/srv/models/not-on-this-host")
    call_command("check", stdout=StringIO(), stderr=StringIO())  # migrate and runserver run the same checks
    samples(MODEL="a/b/c")
    with pytest.raises(SystemCheckError, match=r"gpuscheduler\.E003"):
        call_command("check", stdout=StringIO(), stderr=StringIO())


@pytest.mark.parametrize("option", ["MAX_BATCH", "MAX_PER_REQUEST"])
def test_zero_batch_or_request_size_is_error_e004(samples, option):
    samples(**{option: 0})
    assert ids(check_settings()) == ["gpuscheduler.E004"]


def test_a_lease_shorter_than_three_heartbeats_is_error_e005(gpu):
    gpu(HEARTBEAT_INTERVAL=5.0, LEASE_SECONDS=14.0)
    (problem,) = check_settings()
    assert problem.id == "gpuscheduler.E005"
    assert "GPU_LEASE_SECONDS=14.0" in problem.msg and "GPU_HEARTBEAT_INTERVAL=5.0" in problem.msg
    assert "3 x" in problem.hint


def test_a_lease_of_three_heartbeats_passes(gpu):
    gpu(HEARTBEAT_INTERVAL=5.0, LEASE_SECONDS=15.0)
    assert check_settings() == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/0", "127.0.0.1:6379", "tcp://redis:6379"])
def test_a_redis_url_with_a_wrong_scheme_is_error_e006(settings, url):
    settings.REDIS_URL = url
    (problem,) = check_settings()
    assert problem.id == "gpuscheduler.E006"
    assert isinstance(problem, Error)


@pytest.mark.parametrize("option", ["socket_timeout=abc", "max_connections=many", "health_check_interval=soon"])
def test_a_redis_url_option_redis_py_would_refuse_is_error_e009(settings, option):
    settings.REDIS_URL = f"redis://:pw@127.0.0.1:6379/0?{option}"
    (problem,) = check_settings()
    assert problem.id == "gpuscheduler.E009" and isinstance(problem, Error)
    assert option.split("=")[0] in problem.msg and "pw" not in problem.msg


def test_remote_redis_without_a_password_is_warning_w001(settings):
    settings.REDIS_URL = "redis://redis.internal:6379/0"
    (problem,) = check_settings()
    assert problem.id == "gpuscheduler.W001"
    assert isinstance(problem, Warning) and not isinstance(problem, Error)
    assert "without a password" in problem.msg


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost/1",
        "redis://:s3cret@redis.internal:6379/0",
        "rediss://redis.internal:6380/0",
        "unix:///run/redis/redis.sock",
        "redis://127.0.0.1:6379/0?socket_timeout=30&health_check_interval=0",
    ],
)
def test_local_password_protected_tls_or_socket_redis_passes(settings, url):
    settings.REDIS_URL = url
    assert check_settings() == []


def test_several_problems_are_reported_together(gpu, settings):
    gpu(POLICY="nope", HEARTBEAT_INTERVAL=10.0, LEASE_SECONDS=5.0)
    settings.REDIS_URL = "http://x"
    assert ids(check_settings()) == ["gpuscheduler.E001", "gpuscheduler.E005", "gpuscheduler.E006"]


def test_the_check_is_registered_with_django(gpu):
    from django.core.checks import run_checks

    gpu(POLICY="nope")
    assert "gpuscheduler.E001" in [problem.id for problem in run_checks()]


# --- learned costs and batching ------------------------------------------------------------------


def test_call_sizes_are_parsed_sorted_and_deduplicated(env):
    from config.env import env_call_sizes

    assert env_call_sizes(VAR, [1, 4]) == [1, 4]
    env(" 8, 1,4,4 ")
    assert env_call_sizes(VAR, [1, 4]) == [1, 4, 8]
    env("")
    assert env_call_sizes(VAR, [1, 4]) == []


@pytest.mark.parametrize("value", ["0", "1,x", "4,2000", "٤", "1.5", "-1"])
def test_a_bad_call_size_names_the_variable_the_item_and_the_fix(env, value):
    from config.env import env_call_sizes

    env(value)
    with pytest.raises(ImproperlyConfigured, match=rf"{VAR}=.*is not a call size; use whole numbers from 1 to 1024"):
        env_call_sizes(VAR, [1, 4])


def test_calibration_and_batch_wait_are_read_from_the_environment(tmp_path):
    done = settings_in_a_fresh_process(
        tmp_path,
        "[s.SAMPLES['CALIBRATION'], s.SAMPLES['BATCH_WAIT_MS']]",
        SAMPLES_CALIBRATION="2,1",
        SAMPLES_BATCH_WAIT_MS="50",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[1, 2], 50]


def test_a_bad_batch_wait_is_refused_at_start(tmp_path):
    done = settings_in_a_fresh_process(tmp_path, "[s.SAMPLES['BATCH_WAIT_MS']]", SAMPLES_BATCH_WAIT_MS="soon")
    assert done.returncode != 0
    assert "SAMPLES_BATCH_WAIT_MS='soon' is not a whole number" in done.stderr


def test_the_old_saturation_setting_is_reported_as_no_longer_read(monkeypatch):
    monkeypatch.setenv("SAMPLES_GPU_SATURATION", "8")
    (problem,) = [p for p in check_settings() if p.id == "gpuscheduler.W003"]
    assert "no longer read" in problem.msg and "learned" in problem.msg


def test_the_postgresql_connection_carries_the_network_defaults(db):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("libpq's settings: PostgreSQL only")
    connection.ensure_connection()
    parameters = connection.connection.info.get_parameters()  # what libpq connected with
    assert {name: parameters.get(name) for name in POSTGRES_NETWORK_DEFAULTS} == POSTGRES_NETWORK_DEFAULTS


# --- REDIS_URL: the network defaults ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis://127.0.0.1:6379/0",
            "redis://127.0.0.1:6379/0?socket_connect_timeout=3&socket_timeout=10&health_check_interval=15",
        ),
        (  # what the URL sets is kept, and not set twice
            "rediss://:pw@redis.internal:6380/1?socket_timeout=30&ssl_cert_reqs=none",
            "rediss://:pw@redis.internal:6380/1?socket_timeout=30&ssl_cert_reqs=none"
            "&socket_connect_timeout=3&health_check_interval=15",
        ),
        (  # a blank value is none, to redis-py too
            "redis://127.0.0.1:6379/0?socket_timeout=",
            "redis://127.0.0.1:6379/0?socket_timeout=&socket_connect_timeout=3&socket_timeout=10&health_check_interval=15",
        ),
        (
            "unix:///run/redis/redis.sock?db=2",
            "unix:///run/redis/redis.sock?db=2&socket_connect_timeout=3&socket_timeout=10&health_check_interval=15",
        ),
    ],
)
def test_every_redis_url_gets_the_network_defaults_it_does_not_set(url, expected):
    assert redis_url_with_defaults(url) == expected


def test_the_redis_connections_of_rq_and_django_rq_time_out():
    # A Redis behind a silent network would otherwise hold a worker, a press, the RQ dashboard
    # and /metrics (django-rq's collector) forever: redis-py waits without limit by default.
    import django_rq

    from gpuscheduler.queues import redis_connection

    for connection in (redis_connection(), django_rq.get_connection("default")):
        options = connection.connection_pool.connection_kwargs
        assert (options["socket_connect_timeout"], options["socket_timeout"], options["health_check_interval"]) == (
            3,
            10,
            15,
        )
