"""django-rq's dashboard (it deletes, requeues and stops jobs) is for superusers only, at both of its addresses."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import URLPattern, get_resolver, reverse
from django.urls.resolvers import RoutePattern
from rq import Queue

SAMPLE_VALUES = {"IntConverter": 0, "StringConverter": "some-job", "PathConverter": "some/name"}


def _url_for(namespace: str, pattern: URLPattern) -> str:
    if isinstance(pattern.pattern, RoutePattern):
        kwargs = {
            name: SAMPLE_VALUES[type(converter).__name__] for name, converter in pattern.pattern.converters.items()
        }
    else:
        kwargs = dict.fromkeys(pattern.pattern.regex.groupindex, "token")
    return reverse(f"{namespace}:{pattern.name}", kwargs=kwargs)


def every_rq_url() -> list[str]:
    """One URL for every pattern django-rq serves: under admin/rq/ and inside the admin site."""
    urls = []
    for entry in get_resolver().url_patterns:
        if getattr(entry, "namespace", None) == "django_rq":
            urls += [_url_for("django_rq", p) for p in entry.url_patterns]
    from django.contrib import admin
    from django_rq.models import Dashboard

    dashboard_admin = admin.site._registry[Dashboard]
    urls += [_url_for("admin", p) for p in dashboard_admin.get_urls()]
    return sorted(set(urls))


def test_every_rq_url_is_found():
    urls = every_rq_url()
    assert "/admin/rq/" in urls and "/admin/rq/queues/0/empty/" in urls
    assert "/admin/django_rq/dashboard/" in urls and "/admin/django_rq/dashboard/queues/0/some-job/delete/" in urls
    assert len(urls) > 40


@pytest.mark.django_db
def test_anonymous_callers_are_sent_to_the_admin_login_from_every_rq_url():
    client = Client()
    for url in every_rq_url():
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("admin:login") + "?next="), url


@pytest.mark.django_db
def test_staff_who_are_not_superusers_get_403_from_every_rq_url(user_factory):
    client = Client()
    # Even a staff user holding django-rq's own "Access admin page" permission.
    client.force_login(user_factory(perms=("django_rq.admin",)))
    for url in every_rq_url():
        assert client.get(url).status_code == 403, url
        assert client.post(url).status_code == 403, url


def test_staff_cannot_empty_a_queue(user_factory, redis_db):
    queue = Queue("default", connection=redis_db)
    queue.enqueue("os.getpid")
    assert queue.count == 1
    client = Client()
    client.force_login(user_factory(perms=("django_rq.admin",)))

    for url in ("/admin/rq/queues/0/empty/", "/admin/django_rq/dashboard/queues/0/empty/"):
        assert client.post(url).status_code == 403

    assert queue.count == 1


def test_a_superuser_sees_both_dashboards_and_can_empty_a_queue(user_factory, redis_db):
    queue = Queue("default", connection=redis_db)
    queue.enqueue("os.getpid")
    assert queue.count == 1
    client = Client()
    client.force_login(user_factory(superuser=True))

    for url in ("/admin/rq/", "/admin/django_rq/dashboard/", "/admin/rq/queues/0/"):
        response = client.get(url)
        assert response.status_code == 200, url
        assert b"default" in response.content
    assert client.post("/admin/rq/queues/0/empty/").status_code == 302

    assert queue.count == 0


def test_the_admin_index_links_the_dashboard_for_superusers_only(user_factory, redis_db):
    link = b'href="/admin/django_rq/dashboard/"'
    superuser, staff = Client(), Client()
    superuser.force_login(user_factory(superuser=True))
    staff.force_login(user_factory(perms=("django_rq.admin", "personas.view_persona")))

    assert link in superuser.get("/admin/").content
    assert link not in staff.get("/admin/").content


@pytest.mark.django_db
def test_the_dashboard_entry_never_answers_500(user_factory):
    clients = {"anonymous": Client(), "staff": Client(), "superuser": Client(), "non-staff": Client()}
    clients["staff"].force_login(user_factory(perms=("django_rq.admin",)))
    clients["superuser"].force_login(user_factory(superuser=True))
    clients["non-staff"].force_login(user_factory(staff=False))
    # The entry's model has no table: its object URLs are not served at all.
    urls = ["/admin/django_rq/dashboard/", "/admin/django_rq/dashboard/1/change/", "/admin/django_rq/dashboard/add/"]

    statuses = {(kind, url): client.get(url).status_code for kind, client in clients.items() for url in urls}

    assert statuses[("anonymous", urls[0])] == 302
    assert statuses[("staff", urls[0])] == 403
    assert statuses[("non-staff", urls[0])] == 403
    assert statuses[("superuser", urls[1])] == 404
    assert statuses[("superuser", urls[2])] == 404
    assert 500 not in statuses.values()
