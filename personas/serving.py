"""Handing a sample image's (or thumbnail's) bytes to the browser, once the admin has checked the
permission: a signed URL of the bucket, the front server (SAMPLES_SERVE), or Django itself."""

from __future__ import annotations

import logging
import mimetypes
from pathlib import PurePosixPath, PureWindowsPath
from urllib.parse import quote

from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.http import FileResponse, Http404, HttpResponse, HttpResponseRedirect
from django.http.response import HttpResponseBase
from django.utils.http import content_disposition_header

from config.storage import samples_storage, storage_errors, storage_local_path, storage_signed_url

log = logging.getLogger(__name__)


def safe_name(name: str) -> bool:
    """The name comes from a row, never from the request; still, a row naming a path that climbs out
    of the store or an absolute one reaches neither the storage nor a front server's header."""
    return bool(name) and ".." not in name and not name.startswith(("/", "\\")) and not PureWindowsPath(name).drive


def sample_file_response(name: str, *, image_id: int) -> HttpResponseBase:
    """The response that sends the stored file `name` (of image `image_id`, for the logs)."""
    if not safe_name(name):
        raise Http404("No such image.")
    storage = samples_storage()
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    try:
        signed = storage_signed_url(storage, name)
        if signed is not None:
            # Object storage: the browser fetches the bytes from the bucket with a URL that works for
            # S3_SIGNED_URL_SECONDS. admin_view adds never-cache: each view gets a fresh URL.
            response: HttpResponseBase = HttpResponseRedirect(signed[0])
            response["Cache-Control"] = "private"
            return response
        local = storage_local_path(storage, name) if settings.SAMPLES_SERVE != "django" else None
        if local is not None:
            # SAMPLES_SERVE: the front server sends the file from MEDIA_DIR, the permission checked here.
            response = HttpResponse(content_type=content_type)
            if settings.SAMPLES_SERVE == "x-accel-redirect":
                response["X-Accel-Redirect"] = settings.SAMPLES_SERVE_PREFIX + quote(name)
            else:
                response["X-Sendfile"] = str(local)
        else:
            # FileResponse closes the file once the response is sent.
            response = FileResponse(storage.open(name, "rb"), content_type=content_type)
    except (FileNotFoundError, SuspiciousOperation):  # a row naming a path outside the store, too
        raise Http404("The image file is missing.") from None
    except storage_errors() as exc:
        log.error("image %s: the media store cannot be read: %s", image_id, exc)
        return HttpResponse(f"The media store cannot be read: {exc}", status=503, content_type="text/plain")
    response["Content-Disposition"] = content_disposition_header(False, PurePosixPath(name).name) or "inline"
    response["Cache-Control"] = "private, max-age=3600"
    return response


def thumbnail_file_response(image_name: str, thumbnail: str, *, image_id: int) -> HttpResponseBase:
    """The thumbnail's response; the full image's where the row names none or its file is gone (an
    image made before thumbnails, or one whose thumbnail could not be made)."""
    if thumbnail:
        try:
            return sample_file_response(thumbnail, image_id=image_id)
        except Http404:
            pass
    return sample_file_response(image_name, image_id=image_id)
