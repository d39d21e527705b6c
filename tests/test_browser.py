"""A real headless Chromium drives the admin: generate a persona's samples, watch them arrive, check the GPU page.

Screenshots go to the test's tmp dir and, when SCREENSHOT_DIR is set, there too; the README's
pictures are made with

    SCREENSHOT_DIR=docs/screenshots .venv/bin/python -m pytest tests/test_browser.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from django.db import connections
from django.urls import reverse

from gpuscheduler.models import Assignment, AssignmentState, Device, Snapshot
from personas.management.commands.demo_data import DEMO_PERSONAS
from personas.models import RequestState, SampleImage, SampleRequest
from tests.processes import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEVICES = "H100*2,T4:0.25"
IMAGES = 6
TIMEOUT_MS = 90_000


@pytest.fixture
def browser_page(monkeypatch):
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an asyncio loop in this thread, which trips Django's async guard
    # (SynchronousOnlyOperation) on the test's own ORM reads; they are plain synchronous calls.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            context.set_default_timeout(TIMEOUT_MS)
            yield context.new_page()
        finally:
            browser.close()
            # The test's ORM calls ran inside Playwright's context and got a connection of their
            # own; left open, it keeps PostgreSQL from dropping the test database at the end.
            connections.close_all()


def assert_thumbnails_open_full_images(page, request: SampleRequest, images: list[SampleImage]) -> None:
    """Each image of the request shows its WebP thumbnail in its request's group, linked to its full PNG."""
    figures = f"#sample-gallery section.sample-group[data-request-id='{request.pk}'] figure.sample"
    shown = page.eval_on_selector_all(
        figures,
        "els => els.map(f => [f.querySelector('img').getAttribute('src'), f.querySelector('a').getAttribute('href')])",
    )
    assert shown == [
        [
            reverse("admin:personas_persona_thumbnail", args=[image.pk]),
            reverse("admin:personas_persona_image", args=[image.pk]),
        ]
        for image in images
    ]
    kinds = page.evaluate(
        "async (urls) => Promise.all(urls.map(async u => (await fetch(u)).headers.get('content-type')))",
        [src for src, _ in shown],
    )
    assert kinds == ["image/webp"] * len(images), "thumbnails, not the full PNGs"


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / name)
    return path


def test_admin_generates_samples_that_appear_live_and_show_on_the_gpu_status_page(
    live_server, cluster, admin_user, persona_factory, browser_page, tmp_path
):
    # Real tiny-model PNGs from three simulated devices, one of them a slow T4.
    cluster.configure(GPU_SIMULATED=DEVICES, SAMPLES_MODEL="tiny", GPU_MONITOR_INTERVAL="1")
    cluster.start_monitor()
    cluster.start_workers(expect=3)
    persona = persona_factory(**{**DEMO_PERSONAS[0], "default_sample_count": IMAGES})
    page = browser_page

    page.goto(live_server.url + reverse("admin:login"))
    page.fill("#id_username", admin_user.username)
    page.fill("#id_password", "password")
    page.click("input[type=submit]")
    page.wait_for_selector("#user-tools")

    page.goto(live_server.url + reverse("admin:personas_persona_change", args=[persona.pk]))
    page.click("#generate-samples-button")
    page.wait_for_selector("ul.messagelist li.success")
    assert f"Queued {IMAGES} images of Ada Lovelace" in page.inner_text("ul.messagelist")
    assert page.get_attribute("#sample-progress", "data-active") == "1"
    # The page reloads at the top after the press: the progress is in view without scrolling.
    assert page.evaluate("window.scrollY") == 0
    box = page.locator("#sample-progress").bounding_box()
    assert box is not None and box["y"] + 40 < page.viewport_size["height"], f"progress at {box} is below the fold"
    assert page.locator("#request-state").is_visible()
    state = page.locator("#request-state").bounding_box()
    assert state is not None and state["y"] + state["height"] <= page.viewport_size["height"]
    page.evaluate("window.notReloaded = true")

    # The gallery fills itself from the progress JSON; the page is never reloaded.
    page.wait_for_function(f"document.querySelectorAll('#sample-gallery figure.sample').length === {IMAGES}")
    page.wait_for_function("document.getElementById('request-state').textContent.trim() === 'Succeeded'")
    page.wait_for_function(
        "[...document.querySelectorAll('#sample-gallery img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("#sample-gallery figure.sample-new").count() >= 1, "no image was added by the page itself"
    assert page.query_selector("#cancel-request-form") is None, "a finished request offers no Cancel"
    request = SampleRequest.objects.get(persona=persona)
    assert request.state == RequestState.SUCCEEDED
    images = list(SampleImage.objects.filter(request=request).select_related("device").order_by("index"))
    captions = page.eval_on_selector_all("#sample-gallery figcaption", "els => els.map(e => e.innerText)")
    model = request.model_spec["name"]
    assert captions == [f"seed {image.seed}\n{image.device.label}\n{model}" for image in images]
    assert page.inner_text("#request-done") == str(IMAGES)
    assert_thumbnails_open_full_images(page, request, images)
    # Reloaded, the server draws the same gallery: one group for the request, thumbnails that load.
    page.reload()
    header = page.inner_text(f"#sample-gallery section.sample-group[data-request-id='{request.pk}'] h3")
    assert header.startswith(f"Request #{request.pk}") and f"{IMAGES} of {IMAGES} images" in header
    page.wait_for_function(
        "[...document.querySelectorAll('#sample-gallery img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert_thumbnails_open_full_images(page, request, images)
    with page.context.expect_page() as opened:
        page.click(f"#sample-gallery figure[data-image-id='{images[0].pk}'] a")
    full = opened.value
    full.wait_for_load_state()
    assert full.url.endswith(reverse("admin:personas_persona_image", args=[images[0].pk]))
    assert full.evaluate("document.contentType") == "image/png"
    full.close()
    # The persona list shows the newest image's thumbnail.
    page.goto(live_server.url + reverse("admin:personas_persona_changelist"))
    thumb = page.locator("img.persona-thumbnail")
    assert thumb.count() == 1
    newest = max(image.pk for image in images)  # the last committed, whatever its index
    assert thumb.get_attribute("src") == reverse("admin:personas_persona_thumbnail", args=[newest])
    page.wait_for_function("document.querySelector('img.persona-thumbnail').naturalWidth > 0")
    page.goto(live_server.url + reverse("admin:personas_persona_change", args=[persona.pk]))
    ran_on = page.eval_on_selector_all("#request-attempts tr", "rows => rows.map(r => r.cells[4].innerText)")
    assert set(ran_on) == {image.device.label for image in images}
    save_screenshot(page, tmp_path, "persona-samples.png")

    # The GPU status page: every device, and the request's jobs in each device's history.
    devices = list(Device.objects.order_by("pk"))
    assert len(devices) == 3
    wait_for(
        lambda: Snapshot.objects.values("device").distinct().count() == len(devices),
        30,
        f"a reading of every device\n{cluster.logs()}",
    )
    page.goto(live_server.url + reverse("admin:gpuscheduler_gpustatuspage_changelist"))
    for device in devices:
        card = page.locator(f"#gpu-card-{device.pk}")
        assert device.label in card.inner_text()
        assert device.short_uuid in card.inner_text()
    jobs = Assignment.objects.filter(request=request, state=AssignmentState.SUCCEEDED)
    assert jobs.count() >= 2
    for job in jobs:
        drawn = page.locator(f"#gpu-card-{job.device_id} [data-assignment='{job.pk}']")
        assert drawn.count() >= 1, f"job {job.pk} is not in the history of {job.device}"
    assert "Ada Lovelace" in page.inner_text("#gpu-assignments")
    save_screenshot(page, tmp_path, "gpu-status.png")
