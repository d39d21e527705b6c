"""Thumbnails: a small WebP (or JPEG) beside each sample image, for the gallery and the persona list.

The worker encodes a thumbnail from the pipeline's picture while it encodes the PNG (imagegen.py),
off the call's timing, and stores it with the PNG in the same write (personas/attempts.py): the row
names both, so a thumbnail lives and dies with its image (sweep, repair, deletion). Its name is the
image's with `.thumb.webp` (or `.thumb.jpg`) for `.png`, ids only like every sample name.

A thumbnail is a convenience, never data: one that cannot be made leaves the row's `thumbnail`
empty and the gallery shows the full PNG; `verify_samples --repair` makes the missing ones (also
those of images made before thumbnails existed).
"""

from __future__ import annotations

import io
import logging
from typing import Any

from config.storage import SaveError, samples_storage, storage_errors, storage_save_all
from gpuscheduler.conf import samples_config
from personas.models import SampleImage

log = logging.getLogger(__name__)

SUFFIXES = {"webp": ".thumb.webp", "jpeg": ".thumb.jpg"}
THUMBNAIL_FORMATS = tuple(SUFFIXES)
FORMATS = {"webp": "WEBP", "jpeg": "JPEG"}
QUALITY = 80


def thumbnail_settings() -> tuple[str, int]:
    """(format, longest side in pixels) from SAMPLES_THUMBNAIL_FORMAT and SAMPLES_THUMBNAIL_SIZE."""
    config = samples_config()
    return str(config["THUMBNAIL_FORMAT"]), int(config["THUMBNAIL_SIZE"])


def thumbnail_name(image_name: str, fmt: str | None = None) -> str:
    """The thumbnail's name in the samples storage: the image's, its `.png` replaced."""
    fmt = fmt or thumbnail_settings()[0]
    return image_name.removesuffix(".png") + SUFFIXES[fmt]


def thumbnail_encode(picture: Any, fmt: str | None = None, size: int | None = None) -> bytes:
    """Encode a PIL picture as a thumbnail whose longest side is at most `size` pixels.

    WebP at method 2 costs about 7 ms for a 512 px picture here (JPEG about 4 ms): a fraction of the
    PNG's encoding, and done in the same encoder threads.
    """
    from PIL import Image

    default_fmt, default_size = thumbnail_settings()
    fmt, size = fmt or default_fmt, size or default_size
    small = picture.convert("RGB") if picture.mode not in ("RGB", "L") else picture.copy()
    small.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": QUALITY}
    if fmt == "webp":
        options["method"] = 2
    else:
        options["optimize"] = False
    small.save(buffer, format=FORMATS[fmt], **options)
    return buffer.getvalue()


def thumbnail_or_empty(picture: Any) -> bytes:
    """The thumbnail, or b"" when Pillow cannot make one (the gallery then shows the full image)."""
    try:
        return thumbnail_encode(picture)
    except Exception as exc:  # Pillow raises OSError, ValueError, KeyError (no WebP encoder)...
        log.warning("no thumbnail for this image (the gallery shows the full image): %s", exc)
        return b""


def thumbnail_from_png(png: bytes) -> bytes:
    """The thumbnail of a stored PNG (an image made without one); b"" when it cannot be made."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as picture:
            picture.load()
            return thumbnail_encode(picture)
    except Exception as exc:  # not a picture, or one Pillow cannot thumbnail
        log.warning("no thumbnail for this image (the gallery shows the full image): %s", exc)
        return b""


def thumbnails_make(image_ids: list[int]) -> tuple[int, list[str]]:
    """Make the thumbnails of these images from their PNGs, and name them on their rows.

    Returns how many were made and what went wrong with the others. A row deleted meanwhile leaves
    its new thumbnail to the orphan sweep (its attempt succeeded, no row names the file)."""
    storage = samples_storage()
    made, problems = 0, []
    unreadable: tuple[type[Exception], ...] = (*storage_errors(), FileNotFoundError)
    for image in SampleImage.objects.filter(pk__in=image_ids).only("pk", "image", "thumbnail").order_by("pk"):
        name = image.image.name
        try:
            with storage.open(name, "rb") as handle:
                png = handle.read()
        except unreadable as exc:
            problems.append(f"image {image.pk}: {name} cannot be read ({exc}); the gallery shows it as missing")
            continue
        data = thumbnail_from_png(png)
        if not data:
            problems.append(f"image {image.pk}: {name} is not a picture Pillow can read")
            continue
        thumb = thumbnail_name(name)
        try:
            storage_save_all(storage, [(thumb, data)])
        except SaveError as exc:
            problems.append(f"image {image.pk}: the thumbnail {thumb} cannot be written ({exc.error})")
            continue
        # Only the row as it was read: not one whose image was replaced meanwhile.
        made += SampleImage.objects.filter(pk=image.pk, image=name).update(thumbnail=thumb)
    return made, problems
