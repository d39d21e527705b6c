"""A warm shutdown (SIGTERM) of an idle worker is never lost, wherever the signal lands."""

from __future__ import annotations

import pytest
from rq.exceptions import StopRequested

from gpuscheduler.heartbeat import WorkerContext
from gpuscheduler.worker import GpuWorker

pytestmark = pytest.mark.django_db


@pytest.fixture
def idle_worker(device_factory, redis_db):
    device = device_factory("H100", worker=True)
    worker = GpuWorker(WorkerContext(device=device, name="w", host="testhost", generator=None), connection=redis_db)
    worker.set_state("idle")
    return worker


def test_a_stop_requested_while_idle_is_remembered_as_well_as_raised(idle_worker):
    with pytest.raises(StopRequested):
        idle_worker._shutdown()
    assert idle_worker._stop_requested, "the dequeue loop sees it even if a broad except caught the exception"
    assert idle_worker.dequeue_job_and_maintain_ttl(timeout=1) is None


def test_housekeeping_lets_a_stop_request_through(idle_worker, monkeypatch):
    def interrupted() -> bool:
        raise StopRequested()

    monkeypatch.setattr(idle_worker, "_housekeeping", interrupted)
    with pytest.raises(StopRequested):
        idle_worker.housekeeping()
