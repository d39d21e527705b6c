"""Thumbnails (personas/thumbnails.py): made by the worker with each image and stored beside it, served
in its place by the gallery (paginated, grouped by request) and the persona list, and made again by
verify_samples --repair where missing."""

from __future__ import annotations

import io
import re
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from PIL import Image

from gpuscheduler.assignments import assignment_claim
from gpuscheduler.checks import check_thumbnail_format
from personas.attempts import sample_images_commit
from personas.imagegen import GeneratedImage, encode_all, placeholder_image
from personas.models import RequestState, SampleImage, SampleRequest
from personas.selectors import GALLERY_PAGE_SIZE
from personas.services import sample_attempt_files_remove, sample_images_delete, sample_request_submit
from personas.thumbnails import thumbnail_encode, thumbnail_name
from tests.media import files_of, stored_bytes, stored_names
from tests.personas.test_integrity import made
from tests.processes import settings_in_a_fresh_process

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def gpu(device_factory):
    return device_factory("H100", worker=True)


@pytest.fixture
def running(persona, gpu):
    """A request of two images, its only attempt claimed by a worker."""
    request = sample_request_submit(persona=persona, count=2, device=gpu, enqueue=False).request
    (attempt,) = request.assignments.all()
    claimed = assignment_claim(assignment_id=attempt.pk, device=gpu, worker_name="w1", host="testhost", timeout=60)
    assert claimed is not None
    return request, claimed, gpu


def commit(request, assignment, device, images) -> bool:
    return sample_images_commit(
        assignment=assignment, request=request, images=images, device=device, calls=1, peak_memory=None
    )


def picture(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        return opened.copy()


def format_and_size(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as opened:
        return opened.format, opened.size


def large_png(seed: int, size: int = 512) -> GeneratedImage:
    """A picture larger than a thumbnail, encoded as the worker encodes a pipeline's output."""
    (encoded,) = encode_all([picture(placeholder_image(seed).png).resize((size, size))], [seed])
    return encoded


# --- made by the worker ---------------------------------------------------------------------------


def test_each_image_gets_a_webp_thumbnail_no_larger_than_the_setting_named_on_its_row(running):
    request, attempt, gpu = running
    assert commit(request, attempt, gpu, [large_png(request.seed_for(i)) for i in range(2)])

    images = list(SampleImage.objects.filter(request=request).order_by("index"))
    assert stored_names() == files_of(images)
    for image in images:
        assert image.thumbnail == image.image.name.removesuffix(".png") + ".thumb.webp"
        assert format_and_size(stored_bytes(image.thumbnail)) == ("WEBP", (256, 256))


def test_the_jpeg_format_and_the_size_come_from_the_settings(running, settings):
    settings.SAMPLES = {**settings.SAMPLES, "THUMBNAIL_FORMAT": "jpeg", "THUMBNAIL_SIZE": 96}
    request, attempt, gpu = running
    assert commit(request, attempt, gpu, [large_png(request.seed_for(i)) for i in range(2)])

    for image in SampleImage.objects.filter(request=request):
        assert image.thumbnail.endswith(".thumb.jpg")
        assert format_and_size(stored_bytes(image.thumbnail)) == ("JPEG", (96, 96))


def test_the_encoder_makes_the_thumbnail_from_the_picture_with_the_png():
    made_now = placeholder_image(7)
    assert made_now.thumbnail == thumbnail_encode(picture(made_now.png))
    assert format_and_size(made_now.thumbnail) == ("WEBP", (64, 64)), "never larger than the image"


def test_an_image_pillow_cannot_thumbnail_still_commits_without_one_and_shows_in_full(running, admin_client):
    request, attempt, gpu = running
    odd = [GeneratedImage(seed=request.seed_for(i), png=b"not a picture", width=8, height=8) for i in range(2)]

    assert commit(request, attempt, gpu, odd)

    images = list(SampleImage.objects.filter(request=request))
    assert len(images) == 2 and [i.thumbnail for i in images] == ["", ""]
    assert stored_names() == files_of(images) and len(stored_names()) == 2
    response = admin_client.get(reverse("admin:personas_persona_thumbnail", args=[images[0].pk]))
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"not a picture"
    response.close()


# --- removed with their images --------------------------------------------------------------------


def test_deleting_images_removes_their_thumbnails(persona, gpu, settings):
    request = made(persona, settings, 2)
    images = list(SampleImage.objects.filter(request=request))
    assert len(stored_names()) == 4

    sample_images_delete(images=images)

    assert stored_names() == []


def test_an_abandoned_attempts_thumbnails_are_removed_with_its_pngs(running):
    request, attempt, gpu = running
    assert commit(request, attempt, gpu, [placeholder_image(request.seed_for(i)) for i in range(2)])
    names = stored_names()
    SampleImage.objects.filter(request=request).delete()
    attempt.__class__.objects.filter(pk=attempt.pk).update(state="abandoned")
    attempt.refresh_from_db()

    assert sample_attempt_files_remove(assignment=attempt) == 4
    assert len(names) == 4 and stored_names() == []


# --- served ---------------------------------------------------------------------------------------


def test_the_thumbnail_view_sends_the_thumbnail_and_checks_the_permission(persona, gpu, settings, client, user_factory):
    request = made(persona, settings, 1)
    image = SampleImage.objects.get(request=request)
    url = reverse("admin:personas_persona_thumbnail", args=[image.pk])

    client.force_login(user_factory(perms=("personas.view_persona",)))
    response = client.get(url)
    assert (response.status_code, response["Content-Type"]) == (200, "image/webp")
    assert b"".join(response.streaming_content) == stored_bytes(image.thumbnail)
    response.close()

    client.force_login(user_factory(perms=()))
    assert client.get(url).status_code in (403, 404)


def test_the_front_server_gets_the_thumbnails_name(persona, gpu, settings, admin_client):
    settings.SAMPLES_SERVE = "x-accel-redirect"
    image = SampleImage.objects.get(request=made(persona, settings, 1))

    response = admin_client.get(reverse("admin:personas_persona_thumbnail", args=[image.pk]))

    assert response["X-Accel-Redirect"] == settings.SAMPLES_SERVE_PREFIX + image.thumbnail
    assert response.content == b""


def test_a_thumbnail_file_gone_falls_back_to_the_full_image(persona, gpu, settings, admin_client):
    image = SampleImage.objects.get(request=made(persona, settings, 1))
    from config.storage import samples_storage

    samples_storage().delete(image.thumbnail)

    response = admin_client.get(reverse("admin:personas_persona_thumbnail", args=[image.pk]))

    assert (response.status_code, response["Content-Type"]) == (200, "image/png")
    assert b"".join(response.streaming_content) == stored_bytes(image.image.name)
    response.close()


# --- the gallery ----------------------------------------------------------------------------------


def images_of(persona, counts: list[int]) -> list[SampleRequest]:
    """Finished requests of these sizes (oldest first) with an image row per index; no files."""
    requests = []
    for count in counts:
        request = SampleRequest.objects.create(
            persona=persona,
            count=count,
            first_seed=len(requests) * 100,
            model="tiny@x",
            steps=1,
            state=RequestState.SUCCEEDED,
        )
        SampleImage.objects.bulk_create(
            SampleImage(
                persona=persona,
                request=request,
                index=i,
                image=f"samples/persona-{persona.pk}/r{request.pk}-i{i}-a1.png",
                thumbnail=f"samples/persona-{persona.pk}/r{request.pk}-i{i}-a1.thumb.webp",
                seed=request.seed_for(i),
                prompt="p",
                model="tiny@x",
            )
            for i in range(count)
        )
        requests.append(request)
    return requests


NEWER, OLDER = "\u2039 Newer", "Older \u203a"


def change_page(admin_client, persona, query: str = "") -> str:
    response = admin_client.get(reverse("admin:personas_persona_change", args=[persona.pk]) + query)
    assert response.status_code == 200
    return response.content.decode()


def gallery_of(html: str) -> list[tuple[int, list[int]]]:
    """(request id, image indexes) of each group, in page order."""
    groups = re.findall(r'<section class="sample-group" data-request-id="(\d+)">(.*?)</section>', html, re.S)
    return [(int(rid), [int(i) for i in re.findall(r'data-index="(\d+)"', body)]) for rid, body in groups]


def test_the_gallery_groups_by_request_newest_first_and_pages(persona, admin_client):
    old, middle, new = images_of(persona, [16, 40, 4])

    first = change_page(admin_client, persona)
    assert GALLERY_PAGE_SIZE == 48
    first = change_page(admin_client, persona)
    assert gallery_of(first) == [(new.pk, list(range(4))), (middle.pk, list(range(40))), (old.pk, list(range(4)))]
    assert "Page 1 of 2 (60 images)" in first and OLDER in first and NEWER not in first
    assert f"Request #{new.pk}" in first and "4</span> of 4 images" in first and "16</span> of 16 images" in first

    second = change_page(admin_client, persona, "?gallery=2")
    assert gallery_of(second) == [(old.pk, list(range(4, 16)))], "the old request goes on on the next page"
    assert "Page 2 of 2 (60 images)" in second and NEWER in second and OLDER not in second


@pytest.mark.parametrize("page", ["abc", "-1", "9999", "1%00"])
def test_a_bad_gallery_page_shows_the_first_or_the_last(persona, admin_client, page):
    images_of(persona, [16, 16, 16, 16])
    html = change_page(admin_client, persona, f"?gallery={page}")
    assert len(gallery_of(html)) >= 1
    assert re.search(r"Page [12] of 2 \(64 images\)", html)


def test_each_gallery_image_shows_its_thumbnail_and_opens_the_full_png(persona, admin_client):
    (request,) = images_of(persona, [2])
    html = change_page(admin_client, persona)
    for image in SampleImage.objects.filter(request=request):
        full = reverse("admin:personas_persona_image", args=[image.pk])
        thumb = reverse("admin:personas_persona_thumbnail", args=[image.pk])
        assert re.search(rf'<a href="{full}" target="_blank" rel="noopener"[^>]*>\s*<img src="{thumb}"', html)


def test_the_page_keeps_the_changelist_filters_in_its_links(persona, admin_client):
    images_of(persona, [16, 16, 16, 16])
    html = change_page(admin_client, persona, "?_changelist_filters=samples%3Dactive")
    assert 'href="?_changelist_filters=samples%3Dactive&amp;gallery=2#persona-samples"' in html


def queries_of_the_change_page(admin_client, persona) -> int:
    change_page(admin_client, persona)  # Django's first-use caches (content types) filled
    with CaptureQueriesContext(connection) as queries:
        change_page(admin_client, persona)
    return len(queries)


def test_a_persona_with_500_images_costs_the_queries_of_one_with_5(persona_factory, admin_client):
    few, many = persona_factory(), persona_factory()
    images_of(few, [5])
    images_of(many, [16] * 31 + [4])
    assert SampleImage.objects.filter(persona=many).count() == 500

    assert queries_of_the_change_page(admin_client, many) == queries_of_the_change_page(admin_client, few)
    html = change_page(admin_client, many)
    assert html.count('class="sample"') == GALLERY_PAGE_SIZE


# --- the persona list -----------------------------------------------------------------------------


def test_the_persona_list_shows_each_personas_newest_thumbnail(persona_factory, admin_client):
    with_images, _without = persona_factory(), persona_factory()
    _, newer = images_of(with_images, [2, 3])
    newest = SampleImage.objects.filter(persona=with_images).order_by("-id").first()

    html = admin_client.get(reverse("admin:personas_persona_changelist")).content.decode()

    assert newest.request_id == newer.pk
    assert html.count('class="persona-thumbnail"') == 1
    thumb = reverse("admin:personas_persona_thumbnail", args=[newest.pk])
    assert f'<img class="persona-thumbnail" src="{thumb}" alt="Newest sample of {with_images.name}"' in html


# --- repair ---------------------------------------------------------------------------------------


def test_verify_counts_images_without_a_thumbnail_and_repair_makes_them(persona, gpu, settings):
    request = made(persona, settings, 3, thumbnails=False)
    out = StringIO()
    call_command("verify_samples", stdout=out)
    assert "3 image(s) without a thumbnail (--repair makes them)." in out.getvalue()
    assert "No problems found." in out.getvalue(), "a missing thumbnail loses nothing"

    out = StringIO()
    call_command("verify_samples", "--repair", stdout=out)

    assert "3 image(s) without a thumbnail, 3 made." in out.getvalue()
    images = list(SampleImage.objects.filter(request=request))
    assert all(i.thumbnail == thumbnail_name(i.image.name) for i in images)
    assert stored_names() == files_of(images) and len(stored_names()) == 6
    assert all(format_and_size(stored_bytes(i.thumbnail))[0] == "WEBP" for i in images)
    out = StringIO()
    call_command("verify_samples", stdout=out)
    assert "without a thumbnail" not in out.getvalue()


# --- settings -------------------------------------------------------------------------------------


def test_a_thumbnail_format_other_than_webp_or_jpeg_stops_the_settings_import(tmp_path):
    result = settings_in_a_fresh_process(tmp_path, "[s.SAMPLES]", SAMPLES_THUMBNAIL_FORMAT="gif")
    assert result.returncode != 0
    assert "SAMPLES_THUMBNAIL_FORMAT" in result.stderr and "webp" in result.stderr and "jpeg" in result.stderr


def test_a_thumbnail_size_out_of_range_stops_the_settings_import(tmp_path):
    result = settings_in_a_fresh_process(tmp_path, "[s.SAMPLES]", SAMPLES_THUMBNAIL_SIZE="8")
    assert result.returncode != 0 and "SAMPLES_THUMBNAIL_SIZE" in result.stderr


def test_webp_without_a_pillow_that_writes_it_is_a_warning_naming_the_fix(monkeypatch):
    from PIL import features

    assert check_thumbnail_format() == []
    monkeypatch.setattr(features, "check", lambda name: False)
    (warning,) = check_thumbnail_format()
    assert warning.id == "samples.W005" and "SAMPLES_THUMBNAIL_FORMAT=jpeg" in warning.hint
