"""The samples storage from the environment (SAMPLES_STORAGE, MEDIA_DIR, S3_*), its checks, and the
folder storage's promise: a file appears whole under its name, or not at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile

import config.storage
from config.storage import check_samples_storage, samples_storage, samples_storage_settings
from gpuscheduler.storage import PROBE_PREFIX, store_check
from personas.integrity import samples_verify
from tests.media import media_root, stored_bytes, stored_names
from tests.processes import settings_in_a_fresh_process

ROOT = Path(__file__).resolve().parent.parent
STORAGE_VARIABLES = (
    "SAMPLES_STORAGE",
    "MEDIA_DIR",
    "S3_BUCKET",
    "S3_ENDPOINT_URL",
    "S3_REGION",
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    "S3_SIGNED_URL_SECONDS",
)


@pytest.fixture
def environ(monkeypatch):
    """No storage variable set; set_env(NAME=value, ...) sets some."""
    for name in STORAGE_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def storage_settings_in_a_fresh_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """MEDIA_ROOT and the samples storage, as a fresh process reads them from `env`."""
    return settings_in_a_fresh_process(
        tmp_path, "[str(s.MEDIA_ROOT), s.STORAGES['samples']]", unset=STORAGE_VARIABLES, **env
    )


# --- settings -------------------------------------------------------------------------------------------


def test_by_default_the_images_go_to_a_durable_folder_under_data_dir(tmp_path):
    result = storage_settings_in_a_fresh_process(tmp_path)
    assert json.loads(result.stdout) == [
        str(tmp_path / "media"),
        {"BACKEND": "config.storage.DurableFileSystemStorage", "OPTIONS": {"location": str(tmp_path / "media")}},
    ]


def test_media_dir_moves_the_folder_for_example_to_a_shared_mount(tmp_path):
    shared = tmp_path / "shared"
    result = storage_settings_in_a_fresh_process(tmp_path / "data", MEDIA_DIR=str(shared))
    assert json.loads(result.stdout) == [
        str(shared),
        {"BACKEND": "config.storage.DurableFileSystemStorage", "OPTIONS": {"location": str(shared)}},
    ]


def test_s3_settings_come_from_the_environment(environ):
    environ(
        SAMPLES_STORAGE="S3",
        S3_BUCKET="persona-samples",
        S3_ENDPOINT_URL="https://minio.example.com:9000/",
        S3_REGION="eu-central-1",
        S3_ACCESS_KEY_ID="key",
        S3_SECRET_ACCESS_KEY="secret",
        S3_SIGNED_URL_SECONDS="60",
    )
    assert samples_storage_settings(media_dir=Path("/unused")) == {
        "BACKEND": "config.storage_s3.SamplesS3Storage",
        "OPTIONS": {
            "bucket_name": "persona-samples",
            "signature_version": "s3v4",
            "endpoint_url": "https://minio.example.com:9000",
            "region_name": "eu-central-1",
            "access_key": "key",
            "secret_key": "secret",
            "signed_url_seconds": 60,
            "querystring_expire": 60,
        },
    }


def test_s3_without_keys_leaves_them_to_boto3_and_streams_with_signed_url_seconds_0(environ):
    environ(SAMPLES_STORAGE="s3", S3_BUCKET="samples", S3_SIGNED_URL_SECONDS="0")
    options = samples_storage_settings(media_dir=Path("/unused"))["OPTIONS"]
    assert "access_key" not in options and "endpoint_url" not in options
    assert (options["signed_url_seconds"], options["querystring_expire"]) == (0, 300)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SAMPLES_STORAGE": "nfs"}, "SAMPLES_STORAGE='nfs' is not one of filesystem, s3."),
        ({"S3_BUCKET": ""}, "SAMPLES_STORAGE=s3 needs S3_BUCKET"),
        ({"S3_BUCKET": "Persona_Samples"}, "S3_BUCKET='Persona_Samples' is not a bucket name"),
        ({"S3_BUCKET": "ab"}, "S3_BUCKET='ab' is not a bucket name"),
        ({"S3_ENDPOINT_URL": "minio:9000"}, "S3_ENDPOINT_URL='minio:9000' is not an endpoint"),
        ({"S3_ENDPOINT_URL": "https://minio/bucket"}, "S3_ENDPOINT_URL='https://minio/bucket' is not an endpoint"),
        ({"S3_REGION": "EU Central"}, "S3_REGION='EU Central' is not a region name"),
        ({"S3_ACCESS_KEY_ID": "key"}, "S3_ACCESS_KEY_ID is set but S3_SECRET_ACCESS_KEY is not"),
        ({"S3_SECRET_ACCESS_KEY": "x"}, "S3_SECRET_ACCESS_KEY is set but S3_ACCESS_KEY_ID is not"),
        ({"S3_SIGNED_URL_SECONDS": "-1"}, "S3_SIGNED_URL_SECONDS=-1 is too small"),
        ({"S3_SIGNED_URL_SECONDS": "604801"}, "S3_SIGNED_URL_SECONDS=604801 is too large"),
    ],
)
def test_bad_storage_settings_are_refused_naming_the_variable(environ, env, message):
    environ(**{"SAMPLES_STORAGE": "s3", "S3_BUCKET": "samples", **env})
    with pytest.raises(ImproperlyConfigured) as refused:
        samples_storage_settings(media_dir=Path("/unused"))
    assert str(refused.value).startswith(message), refused.value


def test_a_bad_storage_setting_stops_the_settings_import(tmp_path):
    result = storage_settings_in_a_fresh_process(tmp_path, SAMPLES_STORAGE="s3")
    assert result.returncode != 0
    assert "ImproperlyConfigured: SAMPLES_STORAGE=s3 needs S3_BUCKET" in result.stderr


# --- checks ---------------------------------------------------------------------------------------------


def s3_settings(settings, environ, **env: str) -> None:
    environ(**{"SAMPLES_STORAGE": "s3", "S3_BUCKET": "samples", **env})
    settings.STORAGES = {**settings.STORAGES, "samples": samples_storage_settings(media_dir=Path("/unused"))}


def check_ids() -> list[str]:
    return [problem.id for problem in check_samples_storage()]


def test_the_default_storage_passes_the_checks(environ):
    assert check_ids() == []


def test_s3_variables_without_samples_storage_s3_are_warning_w003(environ):
    environ(S3_BUCKET="samples")
    (warning,) = check_samples_storage()
    assert warning.id == "samples.W003" and "S3_BUCKET is set but SAMPLES_STORAGE is filesystem" in warning.msg


def test_media_dir_with_s3_is_warning_w002(settings, environ):
    s3_settings(settings, environ, MEDIA_DIR="/srv/media")
    assert check_ids() == ["samples.W002"]


def test_plain_http_to_another_machine_is_warning_w001_and_to_this_one_passes(settings, environ):
    s3_settings(settings, environ, S3_ENDPOINT_URL="http://10.0.0.5:9000")
    assert check_ids() == ["samples.W001"]
    s3_settings(settings, environ, S3_ENDPOINT_URL="http://127.0.0.1:9000")
    assert check_ids() == []


def test_s3_without_django_storages_installed_is_error_e001(settings, environ, monkeypatch):
    s3_settings(settings, environ)
    monkeypatch.setitem(sys.modules, "storages.backends.s3", None)  # import raises ImportError
    (error,) = check_samples_storage()
    assert error.id == "samples.E001" and "pip install -e '.[s3]'" in error.hint


# --- the folder storage ----------------------------------------------------------------------------------


def test_a_file_is_written_under_a_temporary_name_and_appears_whole(monkeypatch):
    real = config.storage._write_part
    seen: list[tuple[str, bool]] = []

    def write(path, chunks):
        seen.append((path.name, (path.parent / "r1-i0-a1.png").exists()))
        real(path, chunks)

    monkeypatch.setattr(config.storage, "_write_part", write)
    name = samples_storage().save("samples/persona-1/r1-i0-a1.png", ContentFile(b"\x89PNG one"))
    assert seen == [("r1-i0-a1.png.part", False)], "nothing under the final name while it is written"
    assert name == "samples/persona-1/r1-i0-a1.png"
    assert stored_names() == [name] and stored_bytes(name) == b"\x89PNG one"


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary_name(monkeypatch):
    def disk_full(path, chunks):
        path.write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(config.storage, "_write_part", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        samples_storage().save("samples/persona-1/r1-i0-a1.png", ContentFile(b"\x89PNG one"))
    assert stored_names() == []


def test_a_name_is_kept_and_its_file_replaced_never_saved_beside_it_under_another_name():
    storage = samples_storage()
    assert storage.save("samples/persona-1/r1-i0-a1.png", ContentFile(b"first")) == "samples/persona-1/r1-i0-a1.png"
    assert storage.save("samples/persona-1/r1-i0-a1.png", ContentFile(b"second")) == "samples/persona-1/r1-i0-a1.png"
    assert stored_names() == ["samples/persona-1/r1-i0-a1.png"]
    assert stored_bytes("samples/persona-1/r1-i0-a1.png") == b"second"


def test_the_store_probe_is_never_taken_for_an_orphan_or_an_unknown_file(db, monkeypatch):
    # A probe a process left behind a moment ago (a probe of a killed process, not old enough to remove).
    leftover = media_root() / f"{PROBE_PREFIX}otherhost-77"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x")
    os.utime(leftover, (0, 0))
    assert store_check(host="testhost").healthy
    young = f"{PROBE_PREFIX}thishost-78"
    samples_storage().save(young, ContentFile(b"x"))

    report = samples_verify(grace_seconds=0)

    assert (report.files_checked, report.orphans, report.unknown) == (0, [], [])
    assert stored_names() == [young], "only the old probe was removed, by the next probe"
