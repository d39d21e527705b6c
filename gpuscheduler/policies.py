"""Pure placement and admission rules: plain functions over frozen dataclasses.

Nothing here touches the ORM, NVML, torch or settings; callers build the views (selectors) and
pass the limits in. Policies rank the devices that may take work; the planner
(gpuscheduler/planning.py) decides how many pipeline calls a request is split into; admission
decides whether a device may take work at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from gpuscheduler.curves import PRIOR, Curve

GIB = 1024**3


@dataclass(frozen=True)
class DeviceView:
    """What placement knows of one device: its latest reading and the work already on it."""

    id: int
    label: str
    kind: str
    healthy: bool
    worker_alive: bool
    memory_used: int | None = None
    memory_total: int | None = None
    utilization: float | None = None
    temperature: float | None = None
    # What a call of n images costs here, learned from the device's own timed calls (or borrowed
    # from its peers until it has some), and the call size it makes best use of.
    curve: Curve = PRIOR
    batch: int = 1
    queued_images: int = 0
    running_images: int = 0
    # Why a device whose recorded health is fine may not take work ("stale (no reading or
    # heartbeat for 2 min 10 s)", a full media store on its host, the model failed to load
    # there); `healthy` is then False.
    blocked: str = ""
    # The model placed for, on this device: whether its worker has it loaded, and what loading it
    # would cost first (its measured load time here, else its peers', else a guess); 0 where it
    # is warm or model affinity is off (GPU_MODEL_AFFINITY).
    warm: bool = False
    load_seconds: float = 0.0

    @property
    def memory_fraction(self) -> float | None:
        if self.memory_used is None or not self.memory_total:
            return None
        return self.memory_used / self.memory_total

    @property
    def backlog(self) -> int:
        return self.queued_images + self.running_images

    # Worked out once per view, these two: placement asks for them of every device several times,
    # inside its turn, and shares views between placements (placement_reads.views_with).
    @cached_property
    def backlog_seconds(self) -> float:
        """How long the work already on it takes by its curve: the running call, then the queued
        images in calls of its best size."""
        return self.curve.cost(self.running_images) + self.curve.work(self.queued_images, self.batch)

    @cached_property
    def ready_seconds(self) -> float:
        """When a new call of the model could start here: its backlog, then loading the model if
        it is not warm (the model of the queued work may differ; its calls are counted alike)."""
        return self.backlog_seconds + _load(self)

    def describe(self) -> str:
        parts = [self.label + ":"]
        fraction = self.memory_fraction
        parts.append("memory n/a," if fraction is None else f"{fraction:.0%} memory used,")
        if self.utilization is not None:
            parts.append(f"{self.utilization:.0f}% busy,")
        if self.temperature is not None:
            parts.append(f"{self.temperature:.0f} C,")
        parts.append(f"{self.queued_images} queued")
        if self.running_images:
            parts.append(f"+ {self.running_images} running")
        if self.warm:
            parts.append("(model warm)")
        elif self.load_seconds:
            parts.append(f"(model to load, ~{self.load_seconds:.1f} s)")
        return " ".join(parts)


@dataclass(frozen=True)
class Ranked:
    """A device in a policy's order. Its reason (the policy's words, then the device's readings)
    is written out only for the devices a plan uses: placement ranks every device in its turn."""

    device: DeviceView
    score: float
    why: str = ""

    @property
    def reason(self) -> str:
        return self.why + self.device.describe()


@dataclass(frozen=True)
class Chunk:
    device_id: int
    first_index: int
    size: int
    reason: str


@dataclass(frozen=True)
class Limits:
    max_temperature: float
    min_free_memory: int


@dataclass(frozen=True)
class Admission:
    ok: bool
    reason: str


Policy = Callable[[Sequence[DeviceView], int], list[Ranked]]


def eligible(devices: Sequence[DeviceView]) -> list[DeviceView]:
    """Healthy devices, preferring those with a live worker (others' queues are stolen from)."""
    healthy = [d for d in devices if d.healthy]
    with_worker = [d for d in healthy if d.worker_alive]
    return with_worker or healthy


def least_memory(devices: Sequence[DeviceView], sequence: int = 0) -> list[Ranked]:
    """Rank by memory occupancy, lowest first (what the old patch did)."""
    candidates = eligible(devices)
    ranked = sorted(candidates, key=lambda d: (d.memory_fraction if d.memory_fraction is not None else 1.0, d.id))
    return [Ranked(d, d.memory_fraction or 0.0, "least memory: ") for d in ranked]


def round_robin(devices: Sequence[DeviceView], sequence: int = 0) -> list[Ranked]:
    """Rotate through the devices, one turn per placement (what the old patch did for batches)."""
    candidates = sorted(eligible(devices), key=lambda d: d.id)
    if not candidates:
        return []
    start = sequence % len(candidates)
    rotated = candidates[start:] + candidates[:start]
    return [
        Ranked(d, float(i), f"round robin turn {sequence + i} of {len(candidates)}: ") for i, d in enumerate(rotated)
    ]


def balanced(devices: Sequence[DeviceView], sequence: int = 0) -> list[Ranked]:
    """Rank by when a new call could start: the time the work already placed takes (by each
    device's learned curve) and loading the model where it is not warm; then utilization, memory
    and temperature."""
    # The readings together weigh at most one image on the cheapest candidate (in seconds).
    candidates = eligible(devices)
    unit = min((d.curve.cost(1) for d in candidates), default=1.0) or 1.0
    scored = []
    for d in candidates:
        backlog = d.ready_seconds / unit
        # Utilization while our own images run is already counted in the backlog; without
        # them it is another program's load.
        foreign = 0.0 if d.running_images else (d.utilization or 0.0) / 100.0
        memory = d.memory_fraction or 0.0
        heat = min(1.0, max(0.0, ((d.temperature or 40.0) - 40.0) / 50.0))
        # Readings together weigh at most one queued image: they separate devices with equal
        # queues and keep work away from a GPU that is hot, full or used by another program.
        scored.append((backlog + 0.4 * foreign + 0.4 * memory + 0.2 * heat, d.id, d))
    scored.sort()  # ids are unique: views are never compared
    return [Ranked(d, round(s, 3)) for s, _, d in scored]


POLICIES: dict[str, Policy] = {
    "balanced": balanced,
    "least_memory": least_memory,
    "round_robin": round_robin,
}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"Unknown GPU_POLICY {name!r}: use one of {', '.join(sorted(POLICIES))}.") from None


def call_cost(device: DeviceView, images: int) -> float:
    """Estimated seconds of one pipeline call of `images` on this device, by its learned curve."""
    return device.curve.cost(images)


# How idle workers take work queued on other devices (GPU_STEAL): "speed" where steal_pays says
# so, "always" from any device with queued work (plain work stealing, for comparison in bench/).
STEAL_RULES = ("speed", "always")


def steal_pays(thief: DeviceView, owner: DeviceView, images: int, *, running_left: float | None = None) -> bool:
    """Should the idle `thief` take a chunk of `images` waiting on `owner`'s queue?

    Always where the owner cannot run it (unhealthy, or no live worker): its queued work must not
    wait for it. Otherwise only where the thief would finish the chunk before the owner finishes
    the work it already has (what is left of its running call, then its queued images), both by
    their learned curves: an idle T4 that took an H100's next call of 8 would finish it after the
    H100 had done both of its own. `running_left` is how long the owner's running call still takes
    where the caller knows it; otherwise half of it is assumed to be left. Counted whole, a call
    about to end made a device half as fast take the 4 images queued behind it, and the burst
    ended 1.2 s after the owner went idle (bench/bench_learning.py). The views are for the
    chunk's model: one without it warm counts loading it.
    """
    if not owner.healthy or not owner.worker_alive:
        return True
    running = owner.curve.cost(owner.running_images)
    left = running / 2 if running_left is None else min(running, max(0.0, running_left))
    # Either one that would have to load the chunk's model first counts the load (model affinity).
    return call_cost(thief, images) + _load(thief) < owner.backlog_seconds - (running - left) + _load(owner)


def _load(device: DeviceView) -> float:
    return 0.0 if device.warm else device.load_seconds


# A device that is out of service for heat takes work again only this many degrees below the
# limit: a GPU hovering at the limit would otherwise flap in and out, with a canary each time.
TEMPERATURE_HYSTERESIS = 5.0


def admit(
    *,
    ok: bool,
    error: str,
    memory_used: int | None,
    memory_total: int | None,
    temperature: float | None,
    limits: Limits,
    recovering: bool = False,
) -> Admission:
    """May a device take new work, judging by one reading? (`recovering`: it is not healthy now.)"""
    if not ok:
        return Admission(False, f"NVML error: {error}" if error else "NVML did not answer")
    if temperature is not None and temperature >= limits.max_temperature:
        return Admission(
            False, f"temperature {temperature:.0f} C is at or above the {limits.max_temperature:.0f} C limit"
        )
    if recovering and temperature is not None and temperature >= limits.max_temperature - TEMPERATURE_HYSTERESIS:
        return Admission(
            False,
            f"temperature {temperature:.0f} C: cooling down to {limits.max_temperature - TEMPERATURE_HYSTERESIS:.0f} C "
            "before it takes work again",
        )
    if memory_used is not None and memory_total:
        free = memory_total - memory_used
        if free < limits.min_free_memory:
            return Admission(
                False, f"{free / GIB:.1f} GiB free, below the {limits.min_free_memory / GIB:.1f} GiB the model needs"
            )
    return Admission(True, "readings within limits")


# --- liveness and storage ------------------------------------------------------------------------


def stale_seconds(
    *, last_seen: datetime | None, worker_seen_at: datetime | None, created: datetime, now: datetime, after: timedelta
) -> float | None:
    """How long a device has gone unheard of, if that makes it stale; None while it is live.

    A device is heard of through a reading (the monitor's or its worker's own) or its worker's
    heartbeat; one that was never heard of counts from its registration. Derived when read, so a
    dead host needs nobody to write anything, and the device is live again at its next reading.
    """
    heard = max(t for t in (last_seen, worker_seen_at, created) if t is not None)
    silent = (now - heard).total_seconds()
    return silent if silent > after.total_seconds() else None


def age_text(seconds: float) -> str:
    """45 s, 2 min 10 s, 3 h 5 min, 2 d 4 h: an age to the second where that still matters."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def stale_reason(seconds: float) -> str:
    return f"no reading or heartbeat for {age_text(seconds)}"


def store_admit(*, ok: bool, error: str, free_bytes: int | None, min_free_bytes: int) -> Admission:
    """May work start on a host, judging by one reading of its media folder?"""
    if not ok:
        return Admission(False, error or "the media folder cannot be written")
    if free_bytes is not None and free_bytes < min_free_bytes:
        mb = 1024**2
        return Admission(False, f"only {free_bytes / mb:.0f} MB free, below STORAGE_MIN_FREE_MB={min_free_bytes // mb}")
    return Admission(True, "writable, space above STORAGE_MIN_FREE_MB")
