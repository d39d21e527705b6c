"""Test settings for a process whose host clock is off: tests.settings, with the wall clock the
project reads shifted by TEST_CLOCK_OFFSET_SECONDS (negative: behind, positive: ahead).

    DJANGO_SETTINGS_MODULE=tests.settings_skewed TEST_CLOCK_OFFSET_SECONDS=-30 python manage.py gpuworker ...

`django.utils.timezone.now` and `time.time` are shifted; `time.monotonic` is not (thread waits
and timeouts use it, and a machine whose wall clock is off still counts seconds right), nor is
the database's clock. libfaketime would shift everything, but it hangs Python 3.11's timed
waits on threads (`threading.Event.wait`) here. Settings are imported before the project's
modules run, and every module reads `timezone.now()` and `time.time()` through their modules,
so the shift reaches them all. Only a child process should use this module, never the test
process itself.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from tests.settings import *  # noqa: F403

_text = os.environ.get("TEST_CLOCK_OFFSET_SECONDS", "0").strip() or "0"
try:
    CLOCK_OFFSET_SECONDS = float(_text)
except ValueError:
    raise ImproperlyConfigured(f"TEST_CLOCK_OFFSET_SECONDS={_text!r}: give seconds, e.g. -30 or 30") from None

if CLOCK_OFFSET_SECONDS and not getattr(time.time, "skewed", False):
    _real_time = time.time

    def _skewed_time() -> float:
        return _real_time() + CLOCK_OFFSET_SECONDS

    def _skewed_now() -> datetime:
        return datetime.fromtimestamp(_skewed_time(), tz=UTC)

    _skewed_time.skewed = True  # type: ignore[attr-defined]
    time.time = _skewed_time
    timezone.now = _skewed_now
