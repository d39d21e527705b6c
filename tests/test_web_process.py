"""The web process never imports torch, so it can never create a CUDA context."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.urls import reverse

from gpuscheduler.models import Assignment, AssignmentState, Snapshot
from personas.services import sample_request_submit
from tests.processes import ROOT, database_url

pytestmark = pytest.mark.e2e


def test_rendering_every_admin_page_imports_no_torch(
    transactional_db, redis_db, settings, data_dir, admin_user, persona, device_factory
):
    from django.utils import timezone

    device = device_factory("H100")
    Snapshot.objects.create(device=device, taken_at=timezone.now(), memory_used=1, memory_total=2, health="healthy")
    submitted = sample_request_submit(persona=persona, count=2)
    Assignment.objects.filter(request=submitted.request).update(state=AssignmentState.RUNNING, device=device)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url(),
        "DATA_DIR": str(data_dir),
        "REDIS_URL": settings.REDIS_URL,
        "DJANGO_ALLOWED_HOSTS": "testserver",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.web_probe", admin_user.username, str(persona.pk)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    failures = {url: code for url, code in report["statuses"].items() if code >= 400}
    assert not failures, failures
    change_url = reverse("admin:personas_persona_change", args=[persona.pk])
    assert change_url in report["statuses"], "the crawl reached the persona page"
    for polled in (
        reverse("admin:personas_persona_progress", args=[persona.pk]),
        reverse("admin:gpuscheduler_gpustatuspage_data") + "?fragments=1",
    ):
        assert report["statuses"].get(polled) == 200, f"{polled} was fetched and answered"
    assert report["pages"] > 20
    assert report["heavy_modules"] == [], report["heavy_modules"]
