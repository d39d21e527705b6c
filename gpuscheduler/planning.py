"""The planner: how many pipeline calls a request's images are split into, and on which of the
ranked devices (gpuscheduler/policies.py ranks them). Pure, like the policies: plain functions
over their frozen views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gpuscheduler.curves import Curve
from gpuscheduler.policies import Chunk, DeviceView, Ranked, call_cost

# A split must shorten the estimated wait by at least this fraction, or the images stay together.
# On the H100, 4 images in one call took 1.26 s and 1 image 1.23 s: spreading 4 images over 4
# GPUs saves 2% of the wait and costs three GPUs that other requests could have used. 16 images
# took 2.85 s in one call and 1.49 s as two calls of 8 on two GPUs: a 48% shorter wait, worth it.
# The waits are estimated with each device's learned cost curve (gpuscheduler/curves.py). The
# balanced policy counts the wait from when the first device could start the request, so a
# request behind a burst is split by the same rule as one that finds the pool idle.
MIN_SPLIT_GAIN = 0.10


def even_sizes(count: int, parts: int) -> list[int]:
    base, extra = divmod(count, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def assign_sizes(ranked: Sequence[Ranked], sizes: Sequence[int]) -> list[tuple[Ranked, int]]:
    """Give each chunk a device in rank order (round robin and least memory keep their own order)."""
    return [(ranked[i % len(ranked)], size) for i, size in enumerate(sizes)]


def estimated_finish(ranked: Sequence[Ranked], sizes: Sequence[int]) -> float:
    """When the last chunk would finish, placed as assign_sizes places them."""
    finish: dict[int, float] = {}
    for choice, size in assign_sizes(ranked, sizes):
        device = choice.device
        start = finish.get(device.id, device.ready_seconds)
        finish[device.id] = start + call_cost(device, size)
    return max(finish.values())


@dataclass(frozen=True)
class _Candidate:
    """A device as water-filling sees it: its backlog in seconds (read once), curve and rank."""

    id: int
    backlog: float  # until a call of the request's model could start: its work, then loading the model
    curve: Curve
    rank: int
    queued: float = 0.0  # its work alone, without loading the model

    def finish(self, images: int, max_batch: int) -> float:
        return self.backlog + self.curve.work(images, max_batch)


def _fill(count: int, candidates: Sequence[_Candidate], devices: int, max_batch: int) -> tuple[dict[int, int], float]:
    """Give `count` images to at most `devices` of the candidates, each next image (or unit of
    images, for large requests) where it would finish soonest by the device's curve and backlog:
    water-filling, so a device half as fast gets about half as many. `candidates` come in the
    order a new device is opened (by its finish for one unit, then rank), so only the first
    `devices` can ever take images. Returns (images per device id, estimated finish of the last)."""
    unit = max(1, count // 256)
    views = candidates[:devices]
    given: dict[int, int] = {}
    left = count
    while left:
        take = min(unit, left)
        best = min(views, key=lambda v: (v.finish(given.get(v.id, 0) + take, max_batch), v.rank))
        given[best.id] = given.get(best.id, 0) + take
        left -= take
    return given, max(v.finish(given[v.id], max_batch) for v in views if v.id in given)


def plan_chunks(count: int, ranked: Sequence[Ranked], *, max_batch: int, by_finish: bool = False) -> list[Chunk]:
    """Split `count` images into pipeline calls over the ranked devices.

    Split only as far as it shortens the estimated wait by MIN_SPLIT_GAIN: fewer, fuller calls
    make more images per second, and the devices left free take the next request. With
    `by_finish` (the balanced policy) the images are shared out where they would finish soonest
    by each device's learned curve (a device twice as fast gets about twice as many), so a slow
    device is used only where it shortens the wait; otherwise the request is cut into even chunks
    and chunk i takes the i-th device of the ranking (round robin and least memory keep their
    own order).
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    if not ranked:
        raise ValueError("no device to place on")
    if by_finish:
        return _plan_by_finish(count, ranked, max_batch=max_batch)
    fewest = math.ceil(count / max_batch)
    most = max(fewest, min(count, len(ranked)))
    best_parts, best_time = fewest, estimated_finish(ranked, even_sizes(count, fewest))
    for parts in range(fewest + 1, most + 1):
        candidate = estimated_finish(ranked, even_sizes(count, parts))
        if candidate < best_time * (1 - MIN_SPLIT_GAIN):
            best_parts, best_time = parts, candidate
    return _chunks(
        [
            (choice.device.id, choice.reason, size)
            for choice, size in assign_sizes(ranked, even_sizes(count, best_parts))
        ]
    )


def _plan_by_finish(count: int, ranked: Sequence[Ranked], *, max_batch: int) -> list[Chunk]:
    unit = max(1, count // 256)
    # Placement plans over every device inside its turn, so the devices are walked once, as tuples,
    # each one's backlog worked out once (DeviceView.backlog_seconds) for every split tried: in the
    # order in which _fill opens them (by their finish for one unit, then rank).
    # The wait a split must shorten is counted from when the first device could start the request
    # (`start`), not from now: behind a burst every device has seconds of work queued, and 10% of
    # that wait kept each later request whole on one device, so the burst ended with one slow
    # device making a whole request of 4 while the others idled. Loading the model is the
    # request's own work, not a wait: a split that makes two devices load it to save one image's
    # time does not pay.
    opened = []
    start = math.inf
    for rank, r in enumerate(ranked):
        device = r.device
        opened.append((device.ready_seconds + device.curve.work(unit, max_batch), rank))
        start = min(start, device.backlog_seconds)
    opened.sort()
    candidates = []
    for _, rank in opened[:count]:  # only the first `count` can ever take images (_fill)
        device = ranked[rank].device
        candidates.append(_Candidate(device.id, device.ready_seconds, device.curve, rank, device.backlog_seconds))
    # Alone, the request goes where all of it finishes soonest (not where its first image would).
    # A device finishes all of it no sooner than one unit of it, so the walk stops at the first
    # device whose one unit ends after the best whole finish found.
    best_time, alone = math.inf, 0
    for first, rank in opened:
        if first > best_time:
            break
        device = ranked[rank].device
        whole = device.ready_seconds + device.curve.work(count, max_batch)
        if (whole, rank) < (best_time, alone):
            best_time, alone = whole, rank
    best = {ranked[alone].device.id: count}
    for devices in range(2, min(count, len(ranked)) + 1):
        given, finish = _fill(count, candidates, devices, max_batch)
        if finish - start < (best_time - start) * (1 - MIN_SPLIT_GAIN):
            best, best_time = given, finish
    rank_of = {ranked[alone].device.id: alone, **{c.id: c.rank for c in candidates}}
    # In ranking order; more images on one device than one call takes become several even calls.
    pieces = [
        (device_id, ranked[rank_of[device_id]].reason, size)
        for device_id in sorted(best, key=rank_of.__getitem__)
        for size in even_sizes(best[device_id], math.ceil(best[device_id] / max_batch))
    ]
    return _chunks(pieces)


def _chunks(pieces: Sequence[tuple[int, str, int]]) -> list[Chunk]:
    chunks: list[Chunk] = []
    first = 0
    for device_id, reason, size in pieces:
        chunks.append(Chunk(device_id, first, size, reason))
        first += size
    return chunks


def plan_pinned(count: int, device: DeviceView, *, max_batch: int, reason: str) -> list[Chunk]:
    """An explicit device choice bypasses the policy; only the batch limit still splits."""
    chunks: list[Chunk] = []
    first = 0
    for size in even_sizes(count, math.ceil(count / max_batch)):
        chunks.append(Chunk(device.id, first, size, reason))
        first += size
    return chunks
