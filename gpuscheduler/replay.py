"""Replay recorded requests through any placement policy: a discrete-event simulation.

Pure, like policies.py: no ORM, no settings, no workers and no sleeping. Placement builds the same
DeviceViews and calls the same policy and plan_chunks as assignments_place; stealing calls the same
steal_pays as the workers; a call costs what each device's learned curve says. A day of history
(20,000 requests on 8 devices) replays in seconds, so an operator can pick a policy from their own
traffic (`manage.py replay_schedule`). The inputs are loaded and checked in replay_trace.py.

What it leaves out: failures, retries, pinned devices and the readings (memory, utilization,
temperature): every device is healthy, has a live worker and runs nothing but these requests.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from gpuscheduler.curves import Curve
from gpuscheduler.planning import plan_chunks
from gpuscheduler.policies import POLICIES, STEAL_RULES, DeviceView, get_policy, steal_pays

# A device filling a call looks this far into each queue for chunks of the same model and steps:
# enough to fill any call, and it keeps a long queue from making every call cost O(queue).
SCAN_DEPTH = 64
DEFAULT = ("balanced", "speed", True)
# How many plans (plan_chunks' answers) a replay remembers before it starts again.
PLAN_MEMO = 100_000


@dataclass(frozen=True)
class SimDevice:
    """One device of the replay: `curves[k]` is what a call costs for the workload's key k."""

    name: str  # short and unique, for the table: "H100#3"
    curves: tuple[Curve, ...]
    detail: str = ""  # where it came from: "GPU 0 H100 on host-a"


@dataclass(frozen=True)
class SimRequest:
    at: float  # seconds from the start of the replay
    images: int
    key: int = 0  # index into Workload.keys


@dataclass(frozen=True)
class Workload:
    devices: tuple[SimDevice, ...]
    requests: tuple[SimRequest, ...]  # sorted by arrival
    keys: tuple[tuple[str, int], ...] = (("", 0),)  # (model, steps) of each key; ("", 0) for "any"
    source: str = ""  # what was replayed, in words

    @property
    def images(self) -> int:
        return sum(r.images for r in self.requests)


@dataclass(frozen=True)
class Scenario:
    policy: str
    steal: str
    batching: bool

    @property
    def is_default(self) -> bool:
        return (self.policy, self.steal, self.batching) == DEFAULT


@dataclass(frozen=True)
class Outcome:
    scenario: Scenario
    makespan: float  # first arrival to last image made
    latency_p50: float
    latency_p90: float
    calls: int
    busy: tuple[float, ...]  # seconds each device spent in calls
    images: tuple[int, ...]  # images each device made
    stolen: int  # chunks run by a device other than the one placement chose
    wall_seconds: float  # how long the replay itself took

    def load(self, device: int) -> float:
        """The share of the makespan device `device` spent in calls."""
        return self.busy[device] / self.makespan if self.makespan > 0 else 0.0


def scenarios(policies: Iterable[str], steals: Iterable[str], batchings: Iterable[bool]) -> list[Scenario]:
    """Every combination, in the order given (unknown names raise ValueError)."""
    policies, steals, batchings = list(policies), list(steals), list(batchings)
    for name in policies:
        get_policy(name)
    for rule in steals:
        if rule not in STEAL_RULES:
            raise ValueError(f"Unknown steal rule {rule!r}: use one of {', '.join(STEAL_RULES)}.")
    return [Scenario(p, s, b) for p in policies for s in steals for b in batchings]


def all_scenarios() -> list[Scenario]:
    return scenarios(POLICIES, STEAL_RULES, (True, False))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank, as bench/bench_scheduling.py reports it."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclass(eq=False)  # compared by identity: queue.remove must find this very chunk
class _Chunk:
    seq: int  # placement order: the oldest chunk has the lowest
    request: int
    images: int
    key: int
    owner: int  # the device placement chose


@dataclass
class _State:
    """The simulated cluster: each device's queue, its running call and what it has done."""

    devices: int
    queues: list[deque[_Chunk]] = field(init=False)
    queued: list[int] = field(init=False)  # images waiting on each device's queue
    running: list[int] = field(init=False)  # images in each device's running call (0: idle)
    current: list[list[_Chunk]] = field(init=False)
    ends: list[float] = field(init=False)  # when each device's running call ends
    busy: list[float] = field(init=False)
    made: list[int] = field(init=False)
    waiting: int = 0  # images queued anywhere

    def __post_init__(self) -> None:
        n = self.devices
        self.queues = [deque() for _ in range(n)]
        self.queued, self.running, self.made = [0] * n, [0] * n, [0] * n
        self.current = [[] for _ in range(n)]
        self.ends = [0.0] * n
        self.busy = [0.0] * n


class _Replay:
    def __init__(self, workload: Workload, scenario: Scenario, max_batch: int) -> None:
        self.workload = workload
        self.scenario = scenario
        self.max_batch = max_batch
        self.policy = get_policy(scenario.policy)
        self.devices = workload.devices
        self.batch = [[curve.best_size(max_batch) for curve in d.curves] for d in self.devices]
        self.state = _State(len(self.devices))
        self.events: list[tuple[float, int, int]] = []  # (finish time, call number, device)
        self.remaining = [0] * len(workload.requests)  # chunks not yet made, per request
        self.finished = [0.0] * len(workload.requests)
        self.placed = 0
        self.calls = 0
        self.stolen = 0
        self.plans: dict[tuple[Any, ...], tuple[tuple[int, int], ...]] = {}

    def view(self, device: int, key: int) -> DeviceView:
        d, s = self.devices[device], self.state
        return DeviceView(
            id=device,
            label=d.name,
            kind="replay",
            healthy=True,
            worker_alive=True,
            curve=d.curves[key],
            batch=self.batch[device][key],
            queued_images=s.queued[device],
            running_images=s.running[device],
        )

    def may_take(self, thief: int, owner: int, chunk: _Chunk, now: float, call: int = 0) -> bool:
        """Whether `thief` may take `chunk` into a call that already holds `call` images: it must
        finish the whole call before the owner would finish the chunk."""
        if self.scenario.steal == "always":
            return True
        left = self.state.ends[owner] - now if self.state.running[owner] else 0.0
        view = self.view(owner, chunk.key)
        return steal_pays(self.view(thief, chunk.key), view, call + chunk.images, running_left=left)

    # --- events -------------------------------------------------------------------------------

    def place(self, index: int) -> None:
        """What assignments_place does for one request: rank, split, queue."""
        request = self.workload.requests[index]
        views = [self.view(i, request.key) for i in range(len(self.devices))]
        ranked = self.policy(views, self.placed)
        s = self.state
        # plan_chunks is pure, and in a replay a device's view is its id, its queued and running
        # images and the request's key: the same plan comes back for the same state, which a day
        # of history meets again and again (most requests find the pool idle or nearly so).
        memo = (request.images, request.key, tuple(r.device.id for r in ranked), tuple(s.queued), tuple(s.running))
        plan = self.plans.get(memo)
        if plan is None:
            chunks = plan_chunks(
                request.images, ranked, max_batch=self.max_batch, by_finish=self.scenario.policy == "balanced"
            )
            plan = tuple((chunk.device_id, chunk.size) for chunk in chunks)
            if len(self.plans) >= PLAN_MEMO:
                self.plans.clear()
            self.plans[memo] = plan
        for device, size in plan:
            self.placed += 1
            s.queues[device].append(_Chunk(self.placed, index, size, request.key, device))
            s.queued[device] += size
            s.waiting += size
            self.remaining[index] += 1

    def finish(self, device: int, now: float) -> None:
        s = self.state
        for chunk in s.current[device]:
            self.remaining[chunk.request] -= 1
            if not self.remaining[chunk.request]:
                self.finished[chunk.request] = now
        s.current[device] = []
        s.running[device] = 0

    def dispatch(self, now: float) -> None:
        """Idle devices take their own oldest chunk first, then (while work waits) steal."""
        s = self.state
        for i in range(len(self.devices)):
            if not s.running[i] and s.queues[i]:
                self.start(i, s.queues[i][0], now)
        if not s.waiting:
            return
        for i in range(len(self.devices)):
            if s.running[i] or not s.waiting:
                continue
            heads = [q[0] for j, q in enumerate(s.queues) if j != i and q]
            allowed = [c for c in heads if self.may_take(i, c.owner, c, now)]
            if allowed:
                self.start(i, min(allowed, key=lambda c: c.seq), now)

    def start(self, device: int, first: _Chunk, now: float) -> None:
        s = self.state
        self.take(s.queues[first.owner], first)
        chunks, total = [first], first.images
        limit = self.batch[device][first.key]
        if self.scenario.batching and total < limit:
            # Fill the call with chunks of the same model and steps: own queue first, then the
            # others' where this device may take their work. An idle owner is taking its own
            # queue's work at this very moment: that is not there to take.
            order = [device] + [j for j in range(len(self.devices)) if j != device and s.running[j]]
            for owner in order:
                queue = s.queues[owner]
                if total >= limit:
                    break
                for chunk in list(islice(queue, SCAN_DEPTH)):
                    if total >= limit:
                        break
                    if chunk.key != first.key or total + chunk.images > limit:
                        continue
                    if owner != device and not self.may_take(device, owner, chunk, now, total):
                        continue
                    self.take(queue, chunk)
                    chunks.append(chunk)
                    total += chunk.images
        cost = self.devices[device].curves[first.key].cost(total)
        s.current[device] = chunks
        s.running[device] = total
        s.ends[device] = now + cost
        s.busy[device] += cost
        s.made[device] += total
        self.stolen += sum(1 for c in chunks if c.owner != device)
        self.calls += 1
        heapq.heappush(self.events, (now + cost, self.calls, device))

    def take(self, queue: deque[_Chunk], chunk: _Chunk) -> None:
        if queue[0] is chunk:
            queue.popleft()
        else:
            queue.remove(chunk)  # within SCAN_DEPTH of the head
        self.state.queued[chunk.owner] -= chunk.images
        self.state.waiting -= chunk.images

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> Outcome:
        started = time.perf_counter()
        requests = self.workload.requests
        n, arrived = len(requests), 0
        events = self.events
        while arrived < n or events:
            now = min(requests[arrived].at if arrived < n else math.inf, events[0][0] if events else math.inf)
            # Calls ending now free their devices before the arrivals of the same instant are placed.
            while events and events[0][0] <= now:
                _, _, device = heapq.heappop(events)
                self.finish(device, now)
            while arrived < n and requests[arrived].at <= now:
                self.place(arrived)
                arrived += 1
            self.dispatch(now)
        first = requests[0].at if requests else 0.0
        latencies = [self.finished[i] - r.at for i, r in enumerate(requests)]
        s = self.state
        return Outcome(
            scenario=self.scenario,
            makespan=max(self.finished, default=first) - first,
            latency_p50=percentile(latencies, 0.5),
            latency_p90=percentile(latencies, 0.9),
            calls=self.calls,
            busy=tuple(s.busy),
            images=tuple(s.made),
            stolen=self.stolen,
            wall_seconds=time.perf_counter() - started,
        )


def simulate(workload: Workload, scenario: Scenario, *, max_batch: int) -> Outcome:
    """Replay the workload's requests under one policy, steal rule and batching choice."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    if not workload.devices:
        raise ValueError("a replay needs at least one device")
    return _Replay(workload, scenario, max_batch).run()


def replay(
    workload: Workload,
    chosen: Sequence[Scenario],
    *,
    max_batch: int,
    progress: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Replay the workload under every scenario; `progress` hears of each as it ends."""
    outcomes = []
    for scenario in chosen:
        outcome = simulate(workload, scenario, max_batch=max_batch)
        if progress is not None:
            progress(outcome)
        outcomes.append(outcome)
    return outcomes


def baseline(outcomes: Sequence[Outcome]) -> Outcome:
    """The row every ratio is taken against: the default scenario, or the first one replayed."""
    return next((o for o in outcomes if o.scenario.is_default), outcomes[0])
