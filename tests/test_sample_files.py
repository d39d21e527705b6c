"""Every sample file is read, written, listed and removed through the samples storage (STORAGES
["samples"], reached by config.storage.samples_storage), never through a local path: so images made on
one machine are served, swept and deleted from any other, whatever the storage is (a shared folder, S3).

These tests read the source: they fail when someone reintroduces `Path(settings.MEDIA_ROOT)` or a raw
file call next to sample code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("config", "gpuscheduler", "personas")
# The storage module itself; config/settings.py, which defines the storages, is not scanned either.
STORAGE_MODULES = {"config/storage.py", "config/storage_s3.py"}

# Raw file-system calls: a sample file touched this way bypasses the storage API.
RAW_FILE_CALLS = {
    "open(": re.compile(r"(?<![\w.])open\("),
    "os.open/replace/rename/remove/unlink/listdir/scandir/walk/fsync/makedirs": re.compile(
        r"\bos\.(open|replace|rename|remove|unlink|listdir|scandir|walk|fsync|makedirs)\("
    ),
    "Path.unlink/write_bytes/read_bytes/write_text/read_text/glob/rglob/iterdir/mkdir": re.compile(
        r"\.(unlink|write_bytes|read_bytes|write_text|read_text|rglob|glob|iterdir|mkdir)\("
    ),
    "shutil": re.compile(r"\bshutil\.\w+\("),
}
# The raw file calls that touch no sample file, each with what it touches. Anything else fails.
ALLOWED_RAW = {
    "personas/tiny_model.py": {
        "open(",
        "os.open/replace/rename/remove/unlink/listdir/scandir/walk/fsync/makedirs",
        "Path.unlink/write_bytes/read_bytes/write_text/read_text/glob/rglob/iterdir/mkdir",
        "shutil",
    },  # the built tiny model under DATA_DIR/models, and its lock file
    "gpuscheduler/backends.py": {"open("},  # /proc/meminfo
    "gpuscheduler/simulated.py": {
        "open(",
        "os.open/replace/rename/remove/unlink/listdir/scandir/walk/fsync/makedirs",
        "Path.unlink/write_bytes/read_bytes/write_text/read_text/glob/rglob/iterdir/mkdir",
    },
    # ^ the simulated devices' state file and its lock
    "gpuscheduler/storage.py": {"shutil"},  # shutil.disk_usage: the free space of a filesystem storage
    # replay_schedule --trace FILE: the operator's own JSON trace, named on the command line
    "gpuscheduler/replay_trace.py": {
        "Path.unlink/write_bytes/read_bytes/write_text/read_text/glob/rglob/iterdir/mkdir"
    },
    "config/env.py": {"Path.unlink/write_bytes/read_bytes/write_text/read_text/glob/rglob/iterdir/mkdir", "open("},
    # ^ the stable host id kept in DATA_DIR
}


def sources() -> dict[str, str]:
    found = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if "/migrations/" not in relative:
                found[relative] = path.read_text()
    return found


def code_lines(text: str) -> list[tuple[int, str]]:
    """The lines of a module without their comments (a comment may name MEDIA_ROOT to explain it)."""
    return [(number, line.split("#", 1)[0]) for number, line in enumerate(text.splitlines(), 1)]


def offences(files: dict[str, str]) -> list[str]:
    found = []
    for name, text in files.items():
        if name in STORAGE_MODULES | {"config/settings.py"}:
            continue
        lines = code_lines(text)
        for n, line in lines:
            if re.search(r"\bMEDIA_ROOT\b|\bsettings\.MEDIA_\w+", line):
                found.append(f"{name}:{n}: the media folder's path: {line.strip()}")
            if re.search(r"\bdefault_storage\b|\bstorages\[|\bFileSystemStorage\b", line):
                found.append(f"{name}:{n}: a storage other than samples_storage(): {line.strip()}")
            # SampleImage.image is a plain name: its FieldFile would reach Django's default storage.
            if re.search(r"\.image\.(url|path|open|read|delete|save|size|file)\b", line):
                found.append(f"{name}:{n}: the image field's own storage: {line.strip()}")
        allowed = ALLOWED_RAW.get(name, set())
        for label, pattern in RAW_FILE_CALLS.items():
            if label not in allowed:
                found += [f"{name}:{n}: {label}: {line.strip()}" for n, line in lines if pattern.search(line)]
    return found


def test_no_code_reads_or_writes_a_sample_file_outside_the_storage_api():
    assert offences(sources()) == []


@pytest.mark.parametrize(
    "line",
    [
        "    media = Path(settings.MEDIA_ROOT)",
        "    path = Path(settings.MEDIA_DIR) / name",
        "    with open(media / name, 'wb') as handle:",
        "    (media / name).write_bytes(png)",
        "    (media / name).unlink(missing_ok=True)",
        "    os.replace(tmp, path)",
        "    shutil.rmtree(folder)",
        "    default_storage.delete(name)",
        "    storages['default'].save(name, content)",
        "    for left in folder.glob('*.png'):",
        "    return FileResponse(image.image.open('rb'))",
        "    url = image.image.url",
    ],
)
def test_the_check_catches_a_sample_file_touched_outside_the_storage_api(line):
    """The check is not vacuous: each of these, put back into personas/services.py, fails it."""
    files = sources()
    files["personas/services.py"] += f"\n\ndef regression():\n{line}\n"
    (offence,) = offences(files)
    assert offence.startswith("personas/services.py:")


def test_the_samples_storage_is_the_only_storage_the_code_names():
    files = sources()
    accessor = files["config/storage.py"]
    assert "storages[SAMPLES_ALIAS]" in accessor
    users = [name for name, text in files.items() if "samples_storage()" in text and name not in STORAGE_MODULES]
    # Every module that handles sample files goes through the accessor.
    for module in (
        "personas/attempts.py",
        "personas/services.py",
        "personas/integrity.py",
        "personas/serving.py",
        "personas/thumbnails.py",
        "gpuscheduler/storage.py",
    ):
        assert module in users, module
