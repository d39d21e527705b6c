"""Time the persona page with 500 images against one with 5, and the persona list.

    .venv/bin/python bench/bench_gallery.py [--views 30] [--personas 200]

Fills a fresh database with --personas personas of 50 images each (the table's bulk), one persona
with 5 images, one with 48 (a full gallery page) and one with 500 (31 requests of 16 and one of
4), then times --views GETs of each persona's change page (the gallery's first page: at most 48
thumbnails grouped by request) and of the persona list (100 a page, each with its newest
thumbnail) through Django's test Client: median, p90, statements per view. The image bytes a
gallery page makes the browser load are measured on real 512 px pictures: 48 WebP thumbnails
against the 60 full PNGs the gallery showed before thumbnails (same run, same pictures).

Runs on a temporary SQLite file, and also on PostgreSQL when DATABASE_URL names one (in a database
of its own, created on that server and dropped afterwards); each backend in a child process
because Django's settings are fixed once per process. Target: each page under 200 ms; the
500-image page costs what a full page (48) costs, whatever the total.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from harness import child_run, each_backend, table

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 200.0
OLD_GALLERY = 60  # images the gallery showed, full size, before thumbnails and pages
PAGES = ["5 images", "48 images", "500 images", "persona list"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=30, help="Timed GETs per page (the median is shown).")
    parser.add_argument("--personas", type=int, default=200, help="Other personas, 50 images each.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    options = ["--views", str(args.views), "--personas", str(args.personas)]
    redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12")
    results = each_backend(
        "bench-gallery", lambda backend, url, work: child_run(__file__, backend, url, work, options, REDIS_URL=redis)
    )
    sys.exit(1 if print_table(results, args) else 0)


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> bool:
    """Print the tables; True when a page missed the target."""
    print()
    print(f"Persona pages, {args.personas} other personas of 50 images each; {args.views} views per page")
    rows, missed = [], False
    for backend, result in results.items():
        few = result["pages"]["5 images"]["median"]
        for page in PAGES:
            r = result["pages"][page]
            ratio = f"{r['median'] / few:.2f}" if page != "persona list" else ""
            slowest = ", ".join(f"{ms:.1f}" for ms, _ in r["slowest"])
            rows.append([backend, page, f"{r['median']:.1f}", f"{r['p90']:.1f}", r["queries"], slowest, ratio])
            missed = missed or r["median"] >= TARGET_MS
    print(table(["backend", "page", "median ms", "p90 ms", "queries", "slowest statements ms", "/ 5 images"], rows))
    if os.environ.get("BENCH_SQL"):
        for backend, result in results.items():
            for page in PAGES:
                for ms, sql in result["pages"][page]["slowest"]:
                    print(f"  {backend} {page}: {ms:.1f} ms {sql}")
    any_result = next(iter(results.values()))
    b = any_result["bytes"]
    print()
    print("Image bytes one gallery page loads (512 px pictures):")
    print(
        table(
            ["gallery", "images", "KiB", "ratio"],
            [
                [f"before: full PNGs, newest {OLD_GALLERY}", OLD_GALLERY, f"{b['old'] / 1024:.0f}", "1.00"],
                [
                    f"now: WebP thumbnails, page of {b['page']}",
                    b["page"],
                    f"{b['new'] / 1024:.0f}",
                    f"{b['new'] / b['old']:.3f}",
                ],
            ],
        )
    )
    print(f"target: each page under {TARGET_MS:.0f} ms: {'MISSED' if missed else 'ok'}")
    return missed


# --- the child: one database, filled, then viewed -------------------------------------------------


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.urls import reverse

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    few, page, many = fill(args.personas)
    print(f"{args.child}: filled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(User.objects.create_superuser("bench", password="bench-password-1"))
    urls = {
        "5 images": reverse("admin:personas_persona_change", args=[few]),
        "48 images": reverse("admin:personas_persona_change", args=[page]),
        "500 images": reverse("admin:personas_persona_change", args=[many]),
        "persona list": reverse("admin:personas_persona_changelist"),
    }
    pages: dict[str, Any] = {}
    for page, url in urls.items():
        for _ in range(3):  # warm-up: templates, connections, the database's caches
            assert client.get(url).status_code == 200
        statements: list[tuple[float, str]] = []

        def timed(execute: Any, sql: str, params: Any, many: bool, context: Any, into: list[Any] = statements) -> Any:
            begin = time.perf_counter()
            try:
                return execute(sql, params, many, context)
            finally:
                into.append(((time.perf_counter() - begin) * 1000, sql[:60]))

        with connection.execute_wrapper(timed):
            client.get(url)
        timings = []
        for _ in range(args.views):
            begin = time.perf_counter()
            response = client.get(url)
            timings.append((time.perf_counter() - begin) * 1000)
            assert response.status_code == 200
        timings.sort()
        pages[page] = {
            "median": statistics.median(timings),
            "p90": timings[int(0.9 * (len(timings) - 1))],
            "queries": len(statements),
            "slowest": sorted(statements, reverse=True)[:3],
        }
    return {"pages": pages, "bytes": image_bytes()}


def fill(personas: int) -> tuple[int, int, int]:
    """The other personas (50 images each), then one with 5, one with 48 (a full gallery page) and
    one with 500; returns those three ids."""
    from personas.models import Persona, RequestState, SampleImage, SampleRequest

    def persona_with(n: int, counts: list[int]) -> int:
        persona = Persona.objects.create(name=f"Persona {n}", slug=f"persona-{n}", appearance_prompt=f"portrait {n}")
        requests = SampleRequest.objects.bulk_create(
            SampleRequest(
                persona=persona, count=c, first_seed=i * 16, model="tiny@bench", steps=25,
                state=RequestState.SUCCEEDED,
            )
            for i, c in enumerate(counts)
        )  # fmt: skip
        SampleImage.objects.bulk_create(
            SampleImage(
                persona=persona, request=r, index=i, image=f"samples/persona-{persona.pk}/r{r.pk}-i{i}-a1.png",
                thumbnail=f"samples/persona-{persona.pk}/r{r.pk}-i{i}-a1.thumb.webp", seed=r.first_seed + i,
                prompt=persona.appearance_prompt, model="tiny@bench", steps=25, width=512, height=512,
            )
            for r in requests
            for i in range(r.count)
        )  # fmt: skip
        return int(persona.pk)

    for n in range(personas):
        persona_with(n, [16, 16, 16, 2])
    few, page = persona_with(personas, [5]), persona_with(personas + 1, [16] * 3)
    return few, page, persona_with(personas + 2, [16] * 31 + [4])


def image_bytes() -> dict[str, int]:
    """What a gallery page's images weigh: full PNGs (as the worker stores them) against thumbnails."""
    from PIL import Image, ImageFilter

    from personas.imagegen import _encode, placeholder_image
    from personas.selectors import GALLERY_PAGE_SIZE

    pngs, thumbs = [], []
    for seed in range(OLD_GALLERY):
        with Image.open(io.BytesIO(placeholder_image(seed).png)) as small:
            # A smooth 512 px picture, closer to a diffusion model's output than flat placeholder shapes.
            picture = (
                small.convert("RGB").resize((512, 512), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
            )
        encoded = _encode(picture, seed)
        pngs.append(len(encoded.png))
        thumbs.append(len(encoded.thumbnail))
    return {"old": sum(pngs), "new": sum(thumbs[:GALLERY_PAGE_SIZE]), "page": GALLERY_PAGE_SIZE}


if __name__ == "__main__":
    main()
