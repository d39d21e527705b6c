"""Simultaneous presses and placements: one active request per persona, every job placed once."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import Client
from django.urls import reverse

from gpuscheduler.assignments import assignments_place
from gpuscheduler.models import Assignment
from personas.models import ACTIVE_REQUEST_STATES, SampleRequest


def run_at_once(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run `work(i)` in `count` threads released together; return results (or exceptions)."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def target(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except Exception as exc:  # reported to the test, which fails on unexpected ones
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.mark.parametrize("presses", [2, 10])
def test_simultaneous_presses_give_exactly_one_active_request(
    transactional_db, redis_db, persona, device_factory, user_factory, presses
):
    device_factory("H100")
    device_factory("H100")
    user = user_factory(perms=("personas.change_persona", "personas.view_persona"))
    url = reverse("admin:personas_persona_generate", args=[persona.pk])

    def press(i: int) -> int:
        client = Client()
        client.force_login(user)
        return client.post(url, {"count": "4"}).status_code

    statuses = run_at_once(presses, press)

    assert statuses == [302] * presses, statuses
    assert SampleRequest.objects.filter(persona=persona, state__in=ACTIVE_REQUEST_STATES).count() == 1
    assert SampleRequest.objects.filter(persona=persona).count() == 1, "refused presses write nothing"
    request = SampleRequest.objects.get(persona=persona)
    assert sum(a.image_count for a in Assignment.objects.filter(request=request)) == 4
    queued = sum(redis_db.llen(f"rq:queue:{a.queue_name}") for a in Assignment.objects.filter(request=request))
    assert queued == Assignment.objects.filter(request=request).count()


def test_twenty_threads_placing_forty_jobs_place_each_once_and_spread_evenly(
    transactional_db, persona_factory, device_factory
):
    devices = [device_factory("H100") for _ in range(4)]
    requests = [
        SampleRequest.objects.create(persona=persona_factory(), count=1, first_seed=0, model="simulated:0", steps=1)
        for _ in range(40)
    ]

    def place(i: int) -> list[int]:
        placed = []
        for request in requests[2 * i : 2 * i + 2]:
            with transaction.atomic():
                (assignment,) = assignments_place(request_id=request.pk, count=1)
            placed.append(assignment.pk)
        return placed

    results = run_at_once(20, place)

    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    assert Assignment.objects.count() == 40
    assert sorted(Assignment.objects.values_list("request", flat=True)) == sorted(r.pk for r in requests)
    assert len({pk for placed in results for pk in placed}) == 40
    per_device = Counter(Assignment.objects.values_list("planned_device", flat=True))
    # Placements lock the device rows, so each sees the others' work: a perfectly even spread.
    assert per_device == {d.pk: 10 for d in devices}
