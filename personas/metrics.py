"""The personas app's Prometheus metrics: how long a press waits for its last image, and the
requests in flight. Registered with the scheduler's scrape in PersonasConfig.ready()."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

from django.db.models import Count
from prometheus_client.core import GaugeMetricFamily, Metric

from gpuscheduler.metrics import SecondsBetween, gauge_histogram, histogram_counts
from personas.models import ACTIVE_REQUEST_STATES, RequestState, SampleRequest

# Requests pressed in the last 24 hours that ended (the (state, created) index finds them).
LATENCY_WINDOW = timedelta(hours=24)
LATENCY_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
ENDED = (RequestState.SUCCEEDED, RequestState.FAILED)


def request_metrics(now: datetime) -> Iterator[Metric]:
    ended = SampleRequest.objects.filter(
        state__in=ENDED, created__gte=now - LATENCY_WINDOW, finished_at__isnull=False
    ).annotate(latency=SecondsBetween("finished_at", "created"))
    groups = histogram_counts(ended, value="latency", bounds=LATENCY_BUCKETS, by=("state",))
    yield gauge_histogram(
        "persona_samples_request_seconds",
        f"Seconds from a press (or a regenerate_samples request) to its last image, by how it ended: "
        f"requests made in the last {LATENCY_WINDOW.total_seconds() / 3600:.0f} h that have ended.",
        ["state"],
        LATENCY_BUCKETS,
        (([state], counts, total) for (state,), counts, total in groups),
    )
    active = GaugeMetricFamily("persona_samples_active_requests", "Requests queued or running now.", labels=["state"])
    counts = dict(
        SampleRequest.objects.filter(state__in=ACTIVE_REQUEST_STATES)
        .order_by()
        .values_list("state")
        .annotate(n=Count("pk"))
        .values_list("state", "n")
    )
    for state in ACTIVE_REQUEST_STATES:
        active.add_metric([state], counts.get(state, 0))
    yield active
