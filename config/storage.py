"""Where sample images live: one storage alias, STORAGES["samples"], for every write, read, listing
and deletion of a sample file, on every machine of the cluster.

Two kinds, chosen with SAMPLES_STORAGE:

- ``filesystem`` (the default): a folder, MEDIA_DIR (``DATA_DIR/media`` unless set), which several
  machines may share as a mounted network folder. DurableFileSystemStorage writes each file under a
  temporary name, fsyncs it, renames it into place and fsyncs the folder, so a reader, a crash or a
  power cut never finds half a file under its final name.
- ``s3``: an S3-compatible bucket through django-storages (``pip install -e .[s3]``), configured with
  the S3_* variables. A PutObject is atomic, so the same guarantee holds there.

Code reaches the storage through samples_storage() only (tests/test_sample_files.py checks it), so
nothing depends on a local path: the web server of one machine serves what another made.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.core.files.utils import validate_file_name
from django.utils.deconstruct import deconstructible

from config.env import env_choice, env_int, env_str

SAMPLES_ALIAS = "samples"  # the STORAGES alias of sample images
STORAGE_KINDS = ("filesystem", "s3")
PART_SUFFIX = ".part"  # a file being written; integrity.py judges a leftover one by its attempt
SIGNED_URL_SECONDS = 300
FSYNC_THREADS = 8  # parallel fsyncs of one storage_save_all
S3_VARIABLES = ("S3_BUCKET", "S3_ENDPOINT_URL", "S3_REGION", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")
# S3's own rules for a bucket name (no uppercase, no underscore: it becomes part of a host name).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REGION = re.compile(r"[a-z0-9-]{1,40}")


# --- settings (read once, by config/settings.py) ---------------------------------------------------


def samples_storage_settings(*, media_dir: Path) -> dict[str, Any]:
    """STORAGES["samples"] from the environment: SAMPLES_STORAGE=filesystem (in MEDIA_DIR) or s3 (S3_*)."""
    kind = env_choice("SAMPLES_STORAGE", "filesystem", STORAGE_KINDS)
    if kind == "filesystem":
        return {"BACKEND": "config.storage.DurableFileSystemStorage", "OPTIONS": {"location": str(media_dir)}}
    bucket = env_str("S3_BUCKET", "")
    if not bucket:
        raise ImproperlyConfigured("SAMPLES_STORAGE=s3 needs S3_BUCKET: the name of the bucket that holds the images.")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ImproperlyConfigured(
            f"S3_BUCKET={bucket!r} is not a bucket name: 3 to 63 lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit."
        )
    # SigV4: the only signature every AWS region and S3-compatible server accepts for signed URLs.
    options: dict[str, Any] = {"bucket_name": bucket, "signature_version": "s3v4"}
    endpoint = env_str("S3_ENDPOINT_URL", "")
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ImproperlyConfigured(
                f"S3_ENDPOINT_URL={endpoint!r} is not an endpoint: use https://HOST[:PORT] (e.g. "
                "https://s3.eu-central-1.amazonaws.com or http://127.0.0.1:9000), without a path."
            )
        options["endpoint_url"] = endpoint.rstrip("/")
    region = env_str("S3_REGION", "")
    if region:
        if not _REGION.fullmatch(region):
            raise ImproperlyConfigured(f"S3_REGION={region!r} is not a region name: e.g. us-east-1 or eu-central-1.")
        options["region_name"] = region
    key_id, secret = env_str("S3_ACCESS_KEY_ID", ""), env_str("S3_SECRET_ACCESS_KEY", "")
    if bool(key_id) != bool(secret):
        given, missing = ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")[:: 1 if key_id else -1]
        raise ImproperlyConfigured(
            f"{given} is set but {missing} is not: set both, or neither to use AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, ~/.aws or the machine's role."
        )
    if key_id:
        options.update(access_key=key_id, secret_key=secret)
    # 0: the web server streams every image itself (a bucket the browsers cannot reach).
    seconds = env_int("S3_SIGNED_URL_SECONDS", SIGNED_URL_SECONDS, minimum=0, maximum=7 * 24 * 3600)
    options.update(signed_url_seconds=seconds, querystring_expire=seconds or SIGNED_URL_SECONDS)
    return {"BACKEND": "config.storage_s3.SamplesS3Storage", "OPTIONS": options}


# --- the storage -----------------------------------------------------------------------------------


def samples_storage() -> Storage:
    """The storage of every sample image: all reads, writes, listings and deletions go through it."""
    return storages[SAMPLES_ALIAS]


def storage_local_path(storage: Storage, name: str = "") -> Path | None:
    """Where `name` is on this machine, for a storage that keeps files in a folder; None for object storage."""
    try:
        return Path(storage.path(name))
    except NotImplementedError:
        return None


def storage_where(storage: Storage) -> str:
    """Where the storage keeps its files, as an operator reads it: a folder, or s3://BUCKET at ENDPOINT."""
    local = storage_local_path(storage)
    if local is not None:
        return str(local)
    where = getattr(storage, "where", None)
    return where() if callable(where) else type(storage).__name__


def storage_label(storage: Storage, name: str) -> str:
    """A file's name as error messages show it: media/samples/... in a folder, s3://BUCKET/samples/... in S3."""
    local = storage_local_path(storage)
    if local is not None:
        return f"{local.name}/{name}"
    bucket = getattr(storage, "bucket_name", None)
    return f"s3://{bucket}/{name}" if bucket else name


def storage_errors() -> tuple[type[Exception], ...]:
    """What a storage raises when it cannot do its work: OSError from a folder (disk full, read-only,
    unmounted), botocore's errors from S3 (no such bucket, access denied, endpoint unreachable)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def storage_error_text(exc: Exception) -> str:
    """The error without the local path an OSError carries: callers add the file's label."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def storage_signed_url(storage: Storage, name: str) -> tuple[str, int] | None:
    """A short-lived signed URL of `name` and its lifetime in seconds, where the storage offers them
    (S3 with S3_SIGNED_URL_SECONDS above 0); None where the file must be streamed."""
    seconds = int(getattr(storage, "signed_url_seconds", 0) or 0)
    if seconds <= 0:
        return None
    return storage.url(name, expire=seconds), seconds  # type: ignore[call-arg]


class SaveError(Exception):
    """storage_save_all stopped at `name`, which the storage refused with `error`; `saved` are the
    names stored whole before it (nothing of `name` or of the files after it is left)."""

    def __init__(self, error: Exception, *, name: str, saved: list[str]) -> None:
        self.error, self.name, self.saved = error, name, saved
        super().__init__(f"{storage_error_text(error)}: {name}")


def storage_save_all(storage: Storage, files: Sequence[tuple[str, bytes]]) -> list[str]:
    """Save files in order, each whole or not at all (as `storage.save` does), and return their names.

    Raises SaveError at the first file the storage refuses, with the names saved before it. A folder
    storage writes them together, as durably as one by one but with their fsyncs in parallel
    (DurableFileSystemStorage.save_all); another saves them one by one.
    """
    save_all = getattr(storage, "save_all", None)
    if callable(save_all):
        return list(save_all(files))
    saved: list[str] = []
    for name, data in files:
        try:
            saved.append(storage.save(name, ContentFile(data)))
        except storage_errors() as exc:
            raise SaveError(exc, name=name, saved=saved) from exc
    return saved


@deconstructible(path="config.storage.DurableFileSystemStorage")
class DurableFileSystemStorage(FileSystemStorage):
    """A folder where a file appears whole or not at all, and stays after a power cut.

    Names are never changed: sample names carry ids only, so a file already under a name is a leftover
    of the same attempt, replaced (as S3 does), never kept beside a renamed copy no row would name.
    """

    def __init__(self, **options: Any) -> None:
        options.setdefault("allow_overwrite", True)
        super().__init__(**options)

    def _save(self, name: str, content: Any) -> str:
        path = Path(self.path(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + PART_SUFFIX)
        try:
            _write_part(part, content.chunks())
            _fsync(part)
            os.replace(part, path)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
            raise
        _fsync(path.parent)  # the rename survives a power cut before the rows commit
        if self.file_permissions_mode is not None:
            os.chmod(path, self.file_permissions_mode)
        return path.relative_to(self.location).as_posix()

    def save_all(self, files: Sequence[tuple[str, bytes]]) -> list[str]:
        """Save files as `save` does, and as durably: each part written in order and fsynced while
        the next ones are written, renamed into place in order, then each folder fsynced once. A
        fsync costs 1-3 ms and a pipeline call makes up to SAMPLES_MAX_BATCH images: in parallel
        they cost about one. On an error keeps the files before the first one refused and raises
        SaveError."""
        names = [self._valid_name(name) for name, _ in files]
        paths = [Path(self.path(name)) for name in names]
        parts = [path.with_name(path.name + PART_SUFFIX) for path in paths]
        stop = len(files)  # files[:stop] are saved; error: why not the next one
        error: Exception | None = None
        begun = renamed = 0
        syncs: list[Future[OSError | None]] = []
        try:
            for i, ((_, data), part) in enumerate(zip(files, parts, strict=True)):
                begun = i + 1
                try:
                    part.parent.mkdir(parents=True, exist_ok=True)
                    _write_part(part, [data])
                except OSError as exc:
                    stop, error = i, exc
                    break
                syncs.append(_fsync_later(part, alone=len(files) == 1))
            stop, error = _first_failure([sync.result() for sync in syncs], stop, error)
            for i in range(stop):
                try:
                    os.replace(parts[i], paths[i])
                except OSError as exc:
                    stop, error = i, exc
                    break
                renamed = i + 1
            # Each folder once, keyed by its first file: a folder that fails takes its files and all after.
            folders: dict[Path, int] = {}
            for i in range(stop):
                folders.setdefault(paths[i].parent, i)
            failures = _fsync_each(list(folders))
            for first, failure in zip(folders.values(), failures, strict=True):
                if failure is not None and first < stop:
                    stop, error = first, failure
            if self.file_permissions_mode is not None:
                for path in paths[:stop]:
                    os.chmod(path, self.file_permissions_mode)
        except BaseException:
            _unlink(parts[:begun] + paths[:renamed])
            raise
        if error is None:
            return [path.relative_to(self.location).as_posix() for path in paths]
        _unlink(parts[stop:begun] + paths[stop:renamed])
        raise SaveError(error, name=names[stop], saved=[p.relative_to(self.location).as_posix() for p in paths[:stop]])

    def _valid_name(self, name: str) -> str:
        # What Storage.save checks before _save (with allow_overwrite the name is kept).
        validate_file_name(name, allow_relative_path=True)
        name = self.get_available_name(name)
        validate_file_name(name, allow_relative_path=True)
        return name


def _write_part(path: Path, chunks: Iterable[bytes | str]) -> None:
    with open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk.encode() if isinstance(chunk, str) else chunk)
        handle.flush()


def _fsync(path: Path) -> None:
    """fsync a file or a folder: its data, or the names in it, reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_quietly(path: Path) -> OSError | None:
    try:
        _fsync(path)
    except OSError as exc:
        return exc
    return None


_fsync_pool: ThreadPoolExecutor | None = None


def _fsync_later(path: Path, *, alone: bool = False) -> Future[OSError | None]:
    """fsync `path` in a thread of a small pool (fsync releases the GIL, and the file system commits
    concurrent ones together); the future gives its error, or None. `alone`: at once, in this thread."""
    if alone:
        done: Future[OSError | None] = Future()
        done.set_result(_fsync_quietly(path))
        return done
    global _fsync_pool
    if _fsync_pool is None:
        _fsync_pool = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="fsync")
    return _fsync_pool.submit(_fsync_quietly, path)


def _fsync_each(paths: list[Path]) -> list[OSError | None]:
    """fsync every path, in parallel when there are several; returns each one's error, or None."""
    syncs = [_fsync_later(path, alone=len(paths) == 1) for path in paths]
    return [sync.result() for sync in syncs]


def _first_failure(failures: list[OSError | None], stop: int, error: Exception | None) -> tuple[int, Exception | None]:
    for i, failure in enumerate(failures):
        if failure is not None and i < stop:
            return i, failure
    return stop, error


def _unlink(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


# --- system checks (registered by PersonasConfig.ready) ---------------------------------------------


def check_samples_storage(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    from django.conf import settings
    from django.core.checks import Error, Warning

    problems: list[Any] = []
    backend = settings.STORAGES.get(SAMPLES_ALIAS, {}).get("BACKEND", "")
    s3 = backend == "config.storage_s3.SamplesS3Storage"
    if s3:
        try:
            import storages.backends.s3  # noqa: F401
        except ImportError:
            problems.append(
                Error(
                    "SAMPLES_STORAGE=s3 needs django-storages with boto3, which is not installed.",
                    hint="Install the s3 extra: pip install -e '.[s3]'.",
                    id="samples.E001",
                )
            )
        endpoint = urlsplit(settings.STORAGES[SAMPLES_ALIAS]["OPTIONS"].get("endpoint_url") or "https://aws")
        if endpoint.scheme == "http" and endpoint.hostname not in ("127.0.0.1", "localhost", "::1"):
            problems.append(
                Warning(
                    f"S3_ENDPOINT_URL={endpoint.geturl()!r} is plain HTTP to another machine: the images and "
                    "the request signatures cross the network unencrypted.",
                    hint="Use https:// unless the network between them is private.",
                    id="samples.W001",
                )
            )
        if os.environ.get("MEDIA_DIR", "").strip():
            problems.append(
                Warning(
                    "MEDIA_DIR is set but SAMPLES_STORAGE=s3: the images go to the bucket, not to MEDIA_DIR.",
                    hint="Unset MEDIA_DIR, or set SAMPLES_STORAGE=filesystem to use the folder.",
                    id="samples.W002",
                )
            )
    elif backend == "config.storage.DurableFileSystemStorage":
        ignored = [name for name in (*S3_VARIABLES, "S3_SIGNED_URL_SECONDS") if os.environ.get(name, "").strip()]
        if ignored:
            problems.append(
                Warning(
                    f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} set but SAMPLES_STORAGE is "
                    "filesystem: the images go to MEDIA_DIR and the S3 settings are ignored.",
                    hint="Set SAMPLES_STORAGE=s3 to keep the images in the bucket.",
                    id="samples.W003",
                )
            )
    return problems
