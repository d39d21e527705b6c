"""A database that fails mid-request (a deadlock, a lost connection, a lock timeout): the button, Cancel,
the Regenerate action and `regenerate_samples` say so plainly, write nothing half-way and never answer 500."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.messages import constants, get_messages
from django.core.management import CommandError, call_command
from django.db import InterfaceError, OperationalError, connection, connections, transaction
from django.urls import reverse
from django.utils import timezone

from gpuscheduler.models import Assignment, AssignmentState
from gpuscheduler.recovery import assignments_recover
from personas.models import Persona, RequestState, SampleRequest
from personas.services import sample_request_submit

LOST = OperationalError("server closed the connection unexpectedly\n\tThis probably means the server terminated")
DEADLOCK = OperationalError("deadlock detected\nDETAIL:  Process 81 waits for ShareLock on transaction 7")
CLOSED = InterfaceError("connection already closed")


@pytest.fixture
def two_gpus(device_factory):
    return [device_factory("H100"), device_factory("H100")]


@pytest.fixture
def editor_client(client, user_factory):
    client.force_login(user_factory(perms=("personas.view_persona", "personas.change_persona")))
    return client


def generate_url(persona: Persona) -> str:
    return reverse("admin:personas_persona_generate", args=[persona.pk])


def change_url(persona: Persona) -> str:
    return reverse("admin:personas_persona_change", args=[persona.pk])


def messages_of(response) -> list[tuple[int, str]]:
    return [(m.level, str(m)) for m in get_messages(response.wsgi_request)]


def fail_on(statement: str, error: Exception, *, nth: int = 1) -> Callable[..., Any]:
    """A database execute wrapper: the nth statement that starts with `statement` fails with `error`."""
    seen = 0

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        nonlocal seen
        if sql.startswith(statement):
            seen += 1
            if seen == nth:
                raise error
        return execute(sql, params, many, context)

    return wrapper


def assert_nothing_written(persona: Persona) -> None:
    assert not SampleRequest.objects.filter(persona=persona).exists()
    assert not Assignment.objects.filter(request__persona=persona).exists()
    persona.refresh_from_db()
    assert persona.images_requested == 0


# --- the button -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (LOST, "server closed the connection unexpectedly"),
        (DEADLOCK, "deadlock detected"),
        (CLOSED, "connection already closed"),
    ],
)
def test_a_database_error_halfway_through_a_press_says_so_and_writes_nothing(
    editor_client, persona, two_gpus, error, said
):
    # The request row and the persona's counter are written by then: the placement fails.
    with connection.execute_wrapper(fail_on('INSERT INTO "gpuscheduler_assignment"', error)):
        response = editor_client.post(generate_url(persona), {"count": "4", "device": ""})

    assert response.status_code == 302
    assert response["Location"] == change_url(persona)
    assert messages_of(response) == [
        (constants.ERROR, f"The database did not answer ({said}); nothing was queued. Try again in a moment.")
    ]
    assert_nothing_written(persona)


def test_a_database_error_while_reading_the_form_says_so_too(editor_client, persona, two_gpus):
    with connection.execute_wrapper(fail_on('SELECT "gpuscheduler_device"', LOST)):
        response = editor_client.post(generate_url(persona), {"count": "2", "device": str(two_gpus[0].pk)})

    assert response.status_code == 302
    assert response["Location"] == change_url(persona)
    assert messages_of(response) == [
        (
            constants.ERROR,
            "The database did not answer (server closed the connection unexpectedly); nothing was queued. "
            "Try again in a moment.",
        )
    ]
    assert_nothing_written(persona)


@pytest.fixture
def database_busy(transactional_db: None) -> Iterator[Callable[[Persona], None]]:
    """A real database error on the next write: another connection holds the lock the press needs, and
    this one gives up after 0.2 s (PostgreSQL: the persona's row; SQLite: the database's write lock)."""
    release = threading.Event()
    holder: list[threading.Thread] = []

    def hold(persona: Persona) -> None:
        locked = threading.Event()

        def work() -> None:
            try:
                with transaction.atomic():
                    if connection.vendor == "postgresql":
                        Persona.objects.select_for_update().get(pk=persona.pk)
                    else:  # BEGIN IMMEDIATE took the write lock; make it so
                        Persona.objects.filter(pk=persona.pk).update(name=persona.name)
                    locked.set()
                    release.wait(30)
            finally:
                connection.close()

        thread = threading.Thread(target=work, daemon=True)
        holder.append(thread)
        thread.start()
        assert locked.wait(30)
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SET lock_timeout = '200ms'")
            else:
                cursor.execute("PRAGMA busy_timeout = 200")

    yield hold
    release.set()
    for thread in holder:
        thread.join(30)
    connection.close()  # the next test's connection has the usual timeouts


def test_a_real_lock_timeout_at_a_press_answers_with_a_redirect_not_500(
    client, user_factory, persona_factory, device_factory, database_busy
):
    persona = persona_factory(name="Ada Lovelace")
    device_factory("H100")
    client.force_login(user_factory(perms=("personas.change_persona",)))
    database_busy(persona)

    response = client.post(generate_url(persona), {"count": "2"})

    assert response.status_code == 302
    assert response["Location"] == change_url(persona)
    ((level, text),) = messages_of(response)
    said = "canceling statement due to lock timeout" if connection.vendor == "postgresql" else "database is locked"
    assert (level, text) == (
        constants.ERROR,
        f"The database did not answer ({said}); nothing was queued. Try again in a moment.",
    )
    assert_nothing_written(persona)


def test_a_press_whose_commit_went_through_but_whose_reply_was_lost_says_it_was_saved(
    transactional_db, editor_client, persona, two_gpus, redis_db, monkeypatch
):
    wrapper_class = type(connections["default"])
    real_commit = wrapper_class.commit

    def commit_then_lose_the_reply(self: Any) -> None:
        real_commit(self)
        raise LOST

    monkeypatch.setattr(wrapper_class, "commit", commit_then_lose_the_reply)
    try:
        response = editor_client.post(generate_url(persona), {"count": "2"})
    finally:
        monkeypatch.undo()

    assert response.status_code == 302
    assert messages_of(response) == [
        (
            constants.WARNING,
            "The database answered late (server closed the connection unexpectedly), but the request for 2 images "
            "of Ada Lovelace was saved: its jobs are queued within seconds.",
        )
    ]
    request = SampleRequest.objects.get(persona=persona)
    attempts = list(Assignment.objects.filter(request=request))
    assert sum(a.image_count for a in attempts) == 2
    assert all(a.enqueued_at is None for a in attempts), "the on-commit enqueue never ran"
    # The reconciler puts them on their queues, as the message says.
    report = assignments_recover(now=timezone.now() + timedelta(seconds=30))
    assert sorted(report.requeued) == sorted(a.job_id for a in attempts)


# --- Cancel -----------------------------------------------------------------------------------


def test_a_database_error_halfway_through_a_cancel_says_so_and_cancels_nothing(editor_client, persona, two_gpus):
    request = sample_request_submit(persona=persona, count=4, enqueue=False).request
    url = reverse("admin:personas_persona_cancel", args=[persona.pk, request.pk])

    # The request row is marked cancelled by then; its queued attempts fail to follow.
    with connection.execute_wrapper(fail_on('UPDATE "gpuscheduler_assignment"', DEADLOCK)):
        response = editor_client.post(url)

    assert response.status_code == 302
    assert response["Location"] == change_url(persona)
    assert messages_of(response) == [
        (
            constants.ERROR,
            "The database did not answer (deadlock detected); nothing was cancelled. Try again in a moment.",
        )
    ]
    assert SampleRequest.objects.get(pk=request.pk).state == RequestState.QUEUED
    assert set(Assignment.objects.filter(request=request).values_list("state", flat=True)) == {AssignmentState.QUEUED}


# --- the Regenerate action --------------------------------------------------------------------


def test_a_database_error_in_the_action_keeps_what_was_queued_and_names_the_rest(
    transactional_db, admin_client, persona_factory, two_gpus, redis_db
):
    ada = persona_factory(name="Ada", default_sample_count=2)
    bob = persona_factory(name="Bob", default_sample_count=2)
    carol = persona_factory(name="Carol", default_sample_count=2)

    # One INSERT per placement (its chunks in one statement): the second is Bob's.
    with connection.execute_wrapper(fail_on('INSERT INTO "gpuscheduler_assignment"', LOST, nth=2)):
        response = admin_client.post(
            reverse("admin:personas_persona_changelist"),
            {"action": "regenerate_samples", "_selected_action": [ada.pk, bob.pk, carol.pk]},
        )

    assert response.status_code == 302
    a, b = (d.label for d in two_gpus)
    assert messages_of(response) == [
        (constants.SUCCESS, f"Queued 2 images of Ada: 1 on {a}, 1 on {b}."),
        (
            constants.ERROR,
            "The database did not answer (server closed the connection unexpectedly); nothing was queued for "
            "Bob, Carol. Try again in a moment.",
        ),
    ]
    assert SampleRequest.objects.get(persona=ada).count == 2
    assert_nothing_written(bob)
    assert_nothing_written(carol)


# --- regenerate_samples -----------------------------------------------------------------------


def test_a_database_error_in_the_command_is_a_command_error_not_a_traceback(persona, two_gpus, redis_db):
    with (
        connection.execute_wrapper(fail_on('INSERT INTO "gpuscheduler_assignment"', LOST)),
        pytest.raises(CommandError) as caught,
    ):
        call_command("regenerate_samples", "--persona", persona.slug, "--count", "2")

    assert str(caught.value) == (
        "The database did not answer (server closed the connection unexpectedly). Requests reported as queued "
        "above stand; nothing else was queued. Try again in a moment."
    )
    assert_nothing_written(persona)


def test_a_database_error_while_polling_progress_answers_503_with_the_reason_not_500(editor_client, persona):
    url = reverse("admin:personas_persona_progress", args=[persona.pk])
    assert editor_client.get(url).status_code == 200

    with connection.execute_wrapper(fail_on('SELECT "personas_samplerequest"', LOST)):
        response = editor_client.get(url)

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert response.json() == {
        "error": "The database did not answer (server closed the connection unexpectedly); progress is not "
        "updating. Try again in a moment."
    }
