"""Production serving: SAMPLES_SERVE hands images to the front server after Django's permission check,
and the deploy/ files (systemd units, nginx site, env file) name only commands and settings that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.core.management import get_commands
from django.urls import reverse

from config.storage import samples_storage, samples_storage_settings
from gpuscheduler.checks import check_samples_serving
from personas.imagegen import placeholder_image
from personas.models import SampleImage
from tests.processes import settings_in_a_fresh_process

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").iterdir())
NGINX = DEPLOY / "nginx" / "persona-samples.conf"
NAME = "samples/persona-1/r1-i0-a1.png"


@pytest.fixture
def image(persona):
    png = placeholder_image(1).png
    samples_storage().save(NAME, ContentFile(png))
    return SampleImage.objects.create(persona=persona, index=0, image=NAME, seed=1, prompt="p", model="tiny")


@pytest.fixture
def viewer(client, user_factory):
    client.force_login(user_factory(perms=("personas.view_persona",)))
    return client


def image_url(image: SampleImage) -> str:
    return reverse("admin:personas_persona_image", args=[image.pk])


# --- the image view ----------------------------------------------------------------------------------


def test_django_mode_streams_the_png_itself(settings, viewer, image):
    assert settings.SAMPLES_SERVE == "django", "the default"
    response = viewer.get(image_url(image))
    assert (response.status_code, response["Content-Type"]) == (200, "image/png")
    assert response["Content-Disposition"] == 'inline; filename="r1-i0-a1.png"'
    assert "X-Accel-Redirect" not in response and "X-Sendfile" not in response
    assert b"".join(response.streaming_content) == placeholder_image(1).png
    response.close()


def test_x_accel_redirect_hands_nginx_the_storage_name_under_the_prefix_with_an_empty_body(settings, viewer, image):
    settings.SAMPLES_SERVE = "x-accel-redirect"
    response = viewer.get(image_url(image))
    assert response.status_code == 200
    assert response["X-Accel-Redirect"] == f"/protected-samples/{NAME}"
    assert response.content == b""
    assert response["Content-Type"] == "image/png"
    assert response["Content-Disposition"] == 'inline; filename="r1-i0-a1.png"'
    assert response["Cache-Control"].startswith("private")

    settings.SAMPLES_SERVE_PREFIX = "/internal/media/"
    assert viewer.get(image_url(image))["X-Accel-Redirect"] == f"/internal/media/{NAME}"


def test_x_sendfile_hands_the_front_server_the_absolute_local_path_with_an_empty_body(settings, viewer, image):
    settings.SAMPLES_SERVE = "x-sendfile"
    response = viewer.get(image_url(image))
    assert response.status_code == 200
    path = Path(response["X-Sendfile"])
    assert path.is_absolute() and path == (Path(settings.MEDIA_ROOT) / NAME).resolve()
    assert path.read_bytes() == placeholder_image(1).png
    assert response.content == b""
    assert (response["Content-Type"], response["Content-Disposition"]) == (
        "image/png",
        'inline; filename="r1-i0-a1.png"',
    )


@pytest.mark.parametrize("mode", ["django", "x-accel-redirect", "x-sendfile"])
def test_the_permission_is_still_checked_by_django_in_every_mode(settings, client, user_factory, image, mode):
    settings.SAMPLES_SERVE = mode
    url = image_url(image)

    response = client.get(url)  # anonymous: the login page
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))

    client.force_login(user_factory(staff=False, perms=("personas.view_persona",)))
    response = client.get(url)
    assert response.status_code == 403

    # Staff without the view permission: as if there were no such image (nothing says it exists).
    client.force_login(user_factory(perms=()))
    response = client.get(url)
    assert response.status_code == 404
    for forbidden in (response, client.get(url)):
        assert "X-Accel-Redirect" not in forbidden and "X-Sendfile" not in forbidden


@pytest.mark.parametrize("mode", ["django", "x-accel-redirect", "x-sendfile"])
@pytest.mark.parametrize(
    "name", ["samples/../../etc/passwd", "/etc/passwd", "\\etc\\passwd", "C:/Windows/win.ini", "samples/..png"]
)
def test_a_row_naming_a_path_that_climbs_out_or_is_absolute_is_a_404_and_no_header(settings, viewer, image, mode, name):
    settings.SAMPLES_SERVE = mode
    SampleImage.objects.filter(pk=image.pk).update(image=name)
    response = viewer.get(image_url(image))
    assert response.status_code == 404
    assert "X-Accel-Redirect" not in response and "X-Sendfile" not in response


# --- the settings --------------------------------------------------------------------------------------


def serving_settings_in_a_fresh_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return settings_in_a_fresh_process(
        tmp_path, "[s.SAMPLES_SERVE, s.SAMPLES_SERVE_PREFIX]", unset=("SAMPLES_SERVE",), **env
    )


def test_django_streaming_and_the_protected_samples_prefix_are_the_defaults(tmp_path):
    result = serving_settings_in_a_fresh_process(tmp_path)
    assert result.stdout.strip() == '["django", "/protected-samples/"]', result.stderr


def test_the_header_modes_and_a_prefix_are_read(tmp_path):
    result = serving_settings_in_a_fresh_process(
        tmp_path, SAMPLES_SERVE="X-Accel-Redirect", SAMPLES_SERVE_PREFIX="/internal/media/"
    )
    assert result.stdout.strip() == '["x-accel-redirect", "/internal/media/"]', result.stderr


def test_an_unknown_serving_mode_stops_the_settings_import(tmp_path):
    result = serving_settings_in_a_fresh_process(tmp_path, SAMPLES_SERVE="sendfile")
    assert result.returncode != 0
    assert (
        "ImproperlyConfigured: SAMPLES_SERVE='sendfile' is not one of django, x-accel-redirect, x-sendfile"
        in result.stderr
    )


@pytest.mark.parametrize("prefix", ["protected-samples/", "/protected-samples", "/", "/a/../b/", "/a b/"])
def test_a_prefix_that_is_not_a_location_stops_the_settings_import(tmp_path, prefix):
    result = serving_settings_in_a_fresh_process(tmp_path, SAMPLES_SERVE_PREFIX=prefix)
    assert result.returncode != 0
    assert f"ImproperlyConfigured: SAMPLES_SERVE_PREFIX={prefix!r} is not a location" in result.stderr


def test_a_header_mode_with_object_storage_is_warning_w004(settings, monkeypatch):
    assert check_samples_serving() == []
    settings.SAMPLES_SERVE = "x-accel-redirect"
    assert check_samples_serving() == [], "a folder storage: the header mode applies"
    for name, value in {"SAMPLES_STORAGE": "s3", "S3_BUCKET": "samples", "S3_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    settings.STORAGES = {**settings.STORAGES, "samples": samples_storage_settings(media_dir=Path("/unused"))}
    (warning,) = check_samples_serving()
    assert warning.id == "samples.W004"
    assert "SAMPLES_SERVE=x-accel-redirect applies only to a folder storage" in warning.msg
    settings.SAMPLES_SERVE = "django"
    assert check_samples_serving() == []


# --- deploy/ -------------------------------------------------------------------------------------------


def read_settings_names() -> set[str]:
    """Every environment variable the code reads: env_*("NAME", ...) and os.environ lookups in config/."""
    names: set[str] = set()
    for path in (ROOT / "config").glob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r'env_\w+\(\s*"([A-Z][A-Z0-9_]*)"', text))
        names |= set(re.findall(r'environ(?:\.get)?[\[(]\s*"([A-Z][A-Z0-9_]*)"', text))
        names |= set(re.findall(r'"(S3_[A-Z_]+)"', text))  # S3_VARIABLES
    return names


def test_every_manage_py_command_the_units_and_readme_name_exists():
    commands = get_commands()
    texts = [path.read_text() for path in UNITS] + [(ROOT / "README.md").read_text()]
    # `manage.py X`, and `manage X` lines of the README's Production section (its shell function).
    named = {name for text in texts for name in re.findall(r"(?:manage\.py|^manage) (\w+)", text, re.M)}
    assert {"gpuworker", "gpumonitor", "check", "gpustatus", "collectstatic", "migrate"} <= named
    assert sorted(name for name in named if name not in commands) == []


def test_the_units_run_what_exists_with_the_shared_environment_file():
    units = {path.name: path.read_text() for path in UNITS}
    assert set(units) == {"persona-web.service", "gpuworker@.service", "gpumonitor.service", "persona-samples.target"}
    assert "gunicorn config.wsgi:application" in units["persona-web.service"]
    assert "manage.py gpuworker --device %i" in units["gpuworker@.service"]
    worker = units["gpuworker@.service"]
    assert "KillSignal=SIGTERM" in worker
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", worker, re.M).group(1))
    assert stop > 600, "longer than the default SAMPLES_JOB_TIMEOUT: a warm shutdown finishes its job"
    for name, text in units.items():
        if name.endswith(".service"):
            assert "EnvironmentFile=/etc/persona-samples/env" in text
            assert "Restart=on-failure" in text and "NoNewPrivileges=yes" in text
            assert "ProtectSystem=strict" in text and "ReadWritePaths=/var/lib/persona-samples " in text
            assert "User=persona-samples" in text
            assert "WantedBy=persona-samples.target" in text and "PartOf=persona-samples.target" in text


def test_the_env_example_sets_only_settings_the_code_reads():
    known = read_settings_names() | {"DJANGO_SETTINGS_MODULE"}
    lines = [line for line in (DEPLOY / "env.example").read_text().splitlines() if line and not line.startswith("#")]
    names = [line.split("=", 1)[0] for line in lines]
    assert sorted(set(names) - known) == []
    for needed in (
        "DJANGO_SECRET_KEY",
        "DJANGO_ALLOWED_HOSTS",
        "DATABASE_URL",
        "REDIS_URL",
        "MEDIA_DIR",
        "METRICS_TOKEN",
        "GPU_HOST",
    ):
        assert needed in names, needed
    assert "SAMPLES_SERVE=x-accel-redirect" in lines and "LOG_FORMAT=json" in lines


def test_the_nginx_internal_location_is_the_default_prefix_and_aliases_media_dir(settings):
    conf = NGINX.read_text()
    env = dict(
        line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines() if re.match(r"[A-Z]", line)
    )
    internal = re.search(r"location (\S+) \{\s*internal;\s*alias (\S+);", conf)
    assert internal is not None
    assert internal.group(1) == settings.SAMPLES_SERVE_PREFIX == env["SAMPLES_SERVE_PREFIX"] == "/protected-samples/"
    assert internal.group(2) == env["MEDIA_DIR"] + "/"
    assert f"alias {env['DATA_DIR']}/static/;" in conf, "STATIC_ROOT is DATA_DIR/static"
    assert f"location {settings.STATIC_URL} {{" in conf
    for path in ("/metrics", "/healthz", "/readyz"):
        assert reverse(path.strip("/")) == path
        assert re.search(rf"location = {path} \{{\s*proxy_pass http://persona_samples;", conf), path
    assert (
        "server 127.0.0.1:8000;" in conf
        and "--bind 127.0.0.1:8000" in (DEPLOY / "systemd/persona-web.service").read_text()
    )
    assert re.search(r"client_max_body_size \d+[km];", conf)


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The units name /opt/persona-samples and its venv: point them at stand-ins that exist here.
    opt = tmp_path / "opt"
    (opt / ".venv" / "bin").mkdir(parents=True)
    for binary in ("python", "gunicorn"):
        (opt / ".venv" / "bin" / binary).symlink_to(sys.executable)
    (opt / "manage.py").write_text("")
    (opt / "README.md").write_text("")
    units = tmp_path / "units"
    units.mkdir()
    for path in UNITS:
        (units / path.name).write_text(path.read_text().replace("/opt/persona-samples", str(opt)))
    (units / "gpuworker@GPU-0000.service").symlink_to(units / "gpuworker@.service")
    names = ["persona-web.service", "gpumonitor.service", "gpuworker@GPU-0000.service", "persona-samples.target"]
    result = subprocess.run(
        [analyze, "verify", *(str(units / name) for name in names)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"SYSTEMD_LOG_LEVEL": "warning", "PATH": "/usr/bin:/bin"},
    )
    # Unknown users, the absent redis/postgresql units and a container without systemd running are this
    # machine's facts, not the units' faults: only complaints about the files themselves count.
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if str(units) in line or "Unknown key" in line or "Unknown section" in line or "not executable" in line
    ]
    assert problems == []
