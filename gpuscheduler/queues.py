"""Redis and RQ in one place: the connection, queue names and how an assignment is enqueued.

Queue layout (work-conserving in RQ's own terms):
- every device has a queue ``gpu.<device id>`` that the scheduler fills by policy;
- every worker reads its own queue first and then the other devices' queues where stealing pays
  (policies.steal_pays: always from a dead or unhealthy device, from a busy one only where the
  thief would finish the call sooner), so an idle worker helps and a bad device's queue drains;
- jobs pinned to a device by an explicit choice sit on ``gpu.<device id>.pinned``, which only
  that device's worker reads.

An RQ job is only a wake-up call that names an assignment: the database row is the truth, and
every execution starts with an atomic claim of that row, so a job delivered twice runs once.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import redis
from django.conf import settings
from rq import Queue

from config.env import redis_url_with_defaults
from gpuscheduler import workloads
from gpuscheduler.clock import DbNow
from gpuscheduler.conf import samples_config
from gpuscheduler.models import Assignment, AssignmentKind

log = logging.getLogger(__name__)

# Any Redis failure (down, timing out, out of memory, a read-only replica) means "not now": the
# database rows stay as they are and the reconciler retries.
REDIS_ERRORS = (redis.exceptions.RedisError, OSError)


@lru_cache(maxsize=4)
def _connection(url: str) -> redis.Redis:
    # Timeouts from REDIS_URL's query string, or the project's defaults (config/env.py).
    return redis.Redis.from_url(redis_url_with_defaults(url))


def redis_connection() -> redis.Redis:
    return _connection(settings.REDIS_URL)


def device_queue_name(device_id: int, *, pinned: bool = False) -> str:
    return f"gpu.{device_id}.pinned" if pinned else f"gpu.{device_id}"


def get_queue(name: str, connection: redis.Redis | None = None) -> Queue:
    return Queue(name, connection=connection or redis_connection())


def _job_function(kind: AssignmentKind) -> str:
    """The rq job that runs an attempt of this kind: registered by the app that owns the work
    (workloads.SampleWork); canaries run in the worker's process, never through a queue."""
    if kind != AssignmentKind.SAMPLES:
        raise ValueError(f"attempts of kind {kind} are not queued")
    return workloads.sample_work().job


def enqueue_assignment(assignment: Assignment, connection: redis.Redis | None = None) -> None:
    """Put one assignment's job on its queue (raises a Redis error if Redis is down)."""
    config = samples_config()
    queue = get_queue(assignment.queue_name, connection)
    queue.enqueue_call(
        func=_job_function(AssignmentKind(assignment.kind)),
        args=(assignment.pk,),
        job_id=assignment.job_id,
        timeout=config["JOB_TIMEOUT"],
        # The database keeps what a job did (its attempt's row): a result in Redis would only cost a
        # write per job, and rq deletes a finished job at once. A failed one stays a week, to debug.
        result_ttl=0,
        failure_ttl=7 * 86400,
        description=f"assignment {assignment.pk}: {assignment.image_count} images, attempt {assignment.attempt}",
        # A retry goes to the front: its work was already started once, and the time from a
        # worker's death to its work running again should not include the whole backlog.
        at_front=assignment.attempt > 1,
    )


def enqueue_assignments(assignments: list[Assignment]) -> int:
    """Enqueue what can be enqueued now; return how many reached Redis.

    A Redis outage is not an error here: the rows stay QUEUED with no `enqueued_at`, and the
    reconciler (gpuscheduler.recovery.assignments_recover) enqueues them once Redis answers.
    """
    done = 0
    try:
        connection = redis_connection()
        for assignment in assignments:
            enqueue_assignment(assignment, connection)
            Assignment.objects.filter(pk=assignment.pk).update(enqueued_at=DbNow())
            done += 1
    except REDIS_ERRORS as exc:
        log.warning("Redis is unavailable (%s): %d job(s) wait for the reconciler", exc, len(assignments) - done)
    return done


def take_turn(name: str, seconds: float, connection: redis.Redis | None = None) -> bool:
    """True for one caller per `seconds` among all processes sharing this Redis (SET NX EX).

    Also True while Redis is down: a turn is an economy, never a reason to skip the work.
    """
    try:
        connection = connection or redis_connection()
        return bool(connection.set(f"gpuscheduler:turn:{name}", os.getpid(), nx=True, px=int(seconds * 1000)))
    except REDIS_ERRORS:
        return True


def queue_key(name: str) -> str:
    """The Redis list that holds a queue's job ids (rq's own naming)."""
    return Queue.redis_queue_namespace_prefix + name


def queue_job_ids(name: str, connection: redis.Redis) -> set[str]:
    return {jid.decode() if isinstance(jid, bytes) else jid for jid in connection.lrange(queue_key(name), 0, -1)}


def queue_depths(names: list[str], connection: redis.Redis | None = None) -> dict[str, int | None]:
    """Jobs waiting in each queue, in one round trip; None for every queue when Redis is down."""
    try:
        connection = connection or redis_connection()
        with connection.pipeline() as pipe:
            for name in names:
                pipe.llen(queue_key(name))
            lengths = pipe.execute()
    except REDIS_ERRORS:
        return dict.fromkeys(names)
    return {name: int(length) for name, length in zip(names, lengths, strict=True)}


def cancel_job(job_id: str, queue_name: str) -> None:
    """Take a job off its queue (best effort: a job that runs anyway finds its row cancelled)."""
    try:
        redis_connection().lrem(queue_key(queue_name), 0, job_id)
    except REDIS_ERRORS as exc:
        log.info("could not remove job %s from Redis (%s); its claim will fail instead", job_id, exc)
