"""Sample files as the tests see them: through the samples storage, as the code reaches them."""

from __future__ import annotations

from pathlib import Path

from django.core.files.base import ContentFile

from config.storage import samples_storage, storage_local_path


def stored_names(folder: str = "") -> list[str]:
    """Every file in the samples storage (under `folder`), by name, sorted: images, .part files, probes."""
    storage = samples_storage()
    try:
        folders, files = storage.listdir(folder)
    except FileNotFoundError:
        return []
    prefix = f"{folder}/" if folder else ""
    names = [prefix + name for name in files]
    for sub in folders:
        names += stored_names(prefix + sub)
    return sorted(names)


def stored_bytes(name: str) -> bytes:
    with samples_storage().open(name, "rb") as handle:
        return bytes(handle.read())


def store(name: str, data: bytes) -> str:
    return samples_storage().save(name, ContentFile(data))


def media_root() -> Path:
    """The folder of the samples storage, for tests of the filesystem backend that age, damage or
    remove a file in place."""
    root = storage_local_path(samples_storage())
    assert root is not None, "the samples storage keeps no local folder"
    return root


def local_path(name: str) -> Path:
    return media_root() / name


def files_of(images) -> list[str]:  # type: ignore[no-untyped-def]
    """The names of these images' files, sorted: each PNG and the thumbnail its row names."""
    return sorted(name for image in images for name in (image.image.name, image.thumbnail) if name)
