"""Take the README's screenshots from the real app after a stretch of real work.

    .venv/bin/python scripts/screenshots.py [--minutes 12] [--out docs/screenshots]

Starts a throwaway installation (its own DATA_DIR, SQLite and Redis database 11) with three
simulated GPUs running the tiny model, the monitor, the workers and the web server; presses
Generate sample images for the demo personas every few seconds for --minutes, so the status
page's hour of history has something to show; then opens the pages in headless Chromium.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from harness import Installation, wait_for  # noqa: E402

if TYPE_CHECKING:
    from playwright.sync_api import FloatRect

WIDTH = 1280
# The status page's assignments table has 50 rows (about 3,700 px in all): show the top, which
# has the cards, the charts and the queues. The persona page's gallery grows with every request.
STATUS_HEIGHT = 1500
PERSONA_HEIGHT = 2000
# The gallery's <img loading="lazy"> below the fold would be blank in a full-page picture.
LOAD_EVERY_IMAGE = """async () => {
    document.querySelectorAll('img[loading="lazy"]').forEach((img) => { img.loading = "eager"; });
    window.scrollTo(0, document.body.scrollHeight);
    await new Promise((done) => setTimeout(done, 500));
    window.scrollTo(0, 0);
}"""
EVERY_IMAGE_COMPLETE = "Array.from(document.images).every((img) => img.complete)"

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inst = Installation(
        GPU_BACKEND="simulated",
        GPU_SIMULATED="H100*2,T4:0.25",
        SAMPLES_MODEL="tiny",
        SAMPLES_STEPS="20",
        REDIS_URL="redis://127.0.0.1:6379/11",
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
        DEMO_ADMIN_PASSWORD="screenshot-password",
    )
    inst.setup()
    from django.core.management import call_command

    from gpuscheduler.models import Device
    from personas.models import ACTIVE_REQUEST_STATES, Persona, SampleRequest
    from personas.services import sample_request_submit

    try:
        call_command("demo_data", stdout=open(os.devnull, "w"))  # noqa: SIM115
        inst.start("gpumonitor")
        inst.start("gpuworkers")
        inst.start("runserver", f"127.0.0.1:{port}", "--insecure", "--noreload")
        wait_for(lambda: Device.objects.filter(worker_state="idle").count() == 3, 300, "3 workers")
        personas = list(Persona.objects.order_by("pk"))
        deadline = time.monotonic() + args.minutes * 60
        rng = random.Random(7)
        while time.monotonic() < deadline:
            for persona in personas:
                if not SampleRequest.objects.filter(persona=persona, state__in=ACTIVE_REQUEST_STATES).exists():
                    sample_request_submit(persona=persona, count=rng.choice([2, 4, 6, 8]))
            time.sleep(rng.uniform(5, 25))
        wait_for(
            lambda: not SampleRequest.objects.filter(state__in=ACTIVE_REQUEST_STATES).exists(), 600, "the last requests"
        )
        # One last request still running when the pictures are taken.
        showcase = personas[0]
        sample_request_submit(persona=showcase, count=8)
        shoot(port, showcase.pk, Path(args.out))
    finally:
        inst.close()


def shoot(port: int, persona_id: int, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    out.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        page.goto(f"{base}/admin/login/")
        page.fill("#id_username", "admin")
        page.fill("#id_password", "screenshot-password")
        page.click("input[type=submit]")
        page.goto(f"{base}/admin/gpuscheduler/gpustatuspage/")
        time.sleep(2)
        page.screenshot(path=str(out / "gpu-status.png"), full_page=True, clip=top(STATUS_HEIGHT))
        page.goto(f"{base}/admin/personas/persona/{persona_id}/change/")
        time.sleep(6)  # the page updates itself while the last request runs
        page.evaluate(LOAD_EVERY_IMAGE)
        page.wait_for_function(EVERY_IMAGE_COMPLETE, timeout=30_000)
        page.screenshot(path=str(out / "persona-samples.png"), full_page=True, clip=top(PERSONA_HEIGHT))
        browser.close()
    print(f"screenshots written to {out}")


def top(height: int) -> FloatRect:
    """The top `height` pixels of the page (Playwright trims the clip to a shorter page)."""
    return {"x": 0, "y": 0, "width": WIDTH, "height": height}


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
