"""Login throttling on the admin login (django-axes): per username and address, with a clear lockout page."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from axes.models import AccessAttempt
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db.models import F
from django.test import Client, RequestFactory
from django.urls import reverse

from config.login import client_ip

PASSWORD = "right-horse-battery"
ATTACKER = "203.0.113.7"
ELSEWHERE = "198.51.100.20"


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user(username="operator", password=PASSWORD, is_staff=True, is_superuser=True)


def sign_in(client: Client, username: str, password: str, address: str = ATTACKER, **headers: str):
    return client.post(
        reverse("admin:login"),
        {"username": username, "password": password, "next": reverse("admin:index")},
        REMOTE_ADDR=address,
        **headers,
    )


def page_text(response) -> str:
    return " ".join(response.content.decode().split())


def signed_in(client: Client) -> bool:
    return client.get(reverse("admin:index")).status_code == 200


def test_thirty_wrong_passwords_then_the_right_one_is_refused_with_the_lockout_page(staff):
    client = Client()
    statuses = [sign_in(client, "operator", f"guess-{n}").status_code for n in range(30)]
    assert statuses[:4] == [200] * 4, "the first failures show the login form again"
    assert set(statuses[4:]) == {429}, "the fifth failure locks the username out at this address"

    response = sign_in(client, "operator", PASSWORD)
    assert response.status_code == 429
    page = page_text(response)
    assert "after 5 failed sign-ins, “operator” cannot sign in" in page
    assert f"from {ATTACKER} for 15 minutes" in page
    assert "Try again in 15 minutes" in page
    assert f"python manage.py axes_reset_ip_username {ATTACKER} operator" in page
    assert not signed_in(client)


def test_tries_while_locked_out_neither_count_nor_extend_the_lock(staff):
    client = Client()
    for n in range(5):
        sign_in(client, "operator", f"guess-{n}")
    locked_at = AccessAttempt.objects.get().attempt_time
    for n in range(10):
        assert sign_in(client, "operator", f"more-{n}").status_code == 429
    attempt = AccessAttempt.objects.get()
    assert (attempt.failures_since_start, attempt.attempt_time) == (5, locked_at)


def test_the_right_password_from_another_address_still_gets_in(staff):
    attacker = Client()
    for n in range(30):
        sign_in(attacker, "operator", f"guess-{n}")
    assert sign_in(attacker, "operator", PASSWORD).status_code == 429

    admin = Client()
    response = sign_in(admin, "operator", PASSWORD, address=ELSEWHERE)
    assert response.status_code == 302
    assert signed_in(admin)


def test_another_username_from_the_same_address_is_not_locked_out(staff):
    client = Client()
    for n in range(5):
        sign_in(client, "someone-else", f"guess-{n}")
    assert sign_in(client, "someone-else", "guess").status_code == 429
    assert sign_in(client, "operator", PASSWORD).status_code == 302


def test_after_the_cool_off_the_right_password_works_again(staff):
    client = Client()
    for n in range(30):
        sign_in(client, "operator", f"guess-{n}")
    assert sign_in(client, "operator", PASSWORD).status_code == 429
    # 15 minutes and a second pass for the stored failures (no sleeping, no wall clock).
    AccessAttempt.objects.update(attempt_time=F("attempt_time") - timedelta(minutes=15, seconds=1))
    assert sign_in(client, "operator", PASSWORD).status_code == 302
    assert signed_in(client)


def test_the_limit_and_cool_off_come_from_the_settings(staff, settings):
    settings.AXES_FAILURE_LIMIT = 2
    settings.AXES_COOLOFF_TIME = timedelta(minutes=3)
    client = Client()
    assert sign_in(client, "operator", "guess-1").status_code == 200
    response = sign_in(client, "operator", "guess-2")
    assert response.status_code == 429
    assert f"after 2 failed sign-ins, “operator” cannot sign in from {ATTACKER} for 3 minutes" in page_text(response)


def test_a_successful_login_clears_the_count_so_typos_on_other_days_do_not_add_up(staff):
    client = Client()
    for day in range(3):
        for n in range(4):
            assert sign_in(client, "operator", f"typo-{day}-{n}").status_code == 200
        assert sign_in(client, "operator", PASSWORD).status_code == 302
        client.post(reverse("admin:logout"))


def test_axes_reset_unlocks_at_once(staff):
    client = Client()
    for n in range(5):
        sign_in(client, "operator", f"guess-{n}")
    assert sign_in(client, "operator", PASSWORD).status_code == 429
    call_command("axes_reset_ip_username", ATTACKER, "operator", stdout=StringIO())
    assert sign_in(client, "operator", PASSWORD).status_code == 302


def test_forwarded_for_headers_do_not_escape_the_count_unless_behind_a_proxy(staff):
    client = Client()
    for n in range(5):
        sign_in(client, "operator", f"guess-{n}", HTTP_X_FORWARDED_FOR=f"10.0.0.{n}")
    assert sign_in(client, "operator", PASSWORD, HTTP_X_FORWARDED_FOR="10.0.0.99").status_code == 429


@pytest.mark.parametrize(
    ("behind_proxy", "forwarded", "expected"),
    [
        (False, "10.0.0.1", "192.0.2.1"),
        (True, "10.0.0.1", "10.0.0.1"),
        (True, "6.6.6.6, 10.0.0.1", "10.0.0.1"),  # the client wrote the first entry, our proxy the last
        (True, "", "192.0.2.1"),
        (True, "not-an-address", "192.0.2.1"),
        (True, " 2001:db8::1 ", "2001:db8::1"),
    ],
)
def test_the_counted_address_is_the_socket_or_the_last_entry_our_proxy_added(
    settings, behind_proxy, forwarded, expected
):
    settings.BEHIND_PROXY = behind_proxy
    headers = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {}
    request = RequestFactory().post("/admin/login/", REMOTE_ADDR="192.0.2.1", **headers)
    assert client_ip(request) == expected


def test_behind_a_proxy_each_client_address_has_its_own_count(staff, settings):
    settings.BEHIND_PROXY = True
    proxy = "127.0.0.1"
    attacker = Client()
    for n in range(5):
        sign_in(attacker, "operator", f"guess-{n}", address=proxy, HTTP_X_FORWARDED_FOR=ATTACKER)
    assert sign_in(attacker, "operator", PASSWORD, address=proxy, HTTP_X_FORWARDED_FOR=ATTACKER).status_code == 429
    admin = Client()
    assert sign_in(admin, "operator", PASSWORD, address=proxy, HTTP_X_FORWARDED_FOR=ELSEWHERE).status_code == 302
