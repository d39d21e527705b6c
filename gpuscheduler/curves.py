"""Cost curves: what one pipeline call of n images costs on one device, learned from its calls.

Pure functions over frozen dataclasses (no ORM, no settings), like policies.py. The shape is a
fixed cost plus a per-image cost above a saturation knee:

    cost(n) = fixed + per_image * max(n, knee)

Below the knee a call costs about the same whatever its size (the GPU is not yet full); above it
every image adds `per_image`. On the H100 (shared/notes/gpu-measurements.md) calls of 1, 4, 8 and
16 images took 1.23, 1.26, 1.48 and 2.85 s: about 0.11 s + 0.17 s per image with a knee at 6.6.
A simulated `simulated:SECONDS` device is a line through zero: knee 1, fixed 0.

The fit is robust: each call size counts by the median of its recent calls (one slow call, a
page fault or a throttled clock, moves nothing), and the knee is searched on a half-image grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import median

# A call size is "best" when it reaches this share of the throughput of the largest call allowed:
# bigger calls only make each request wait longer for little more throughput.
BEST_SHARE = 0.90
# How many of a size's most recent calls count towards its median.
RECENT_PER_SIZE = 25
# The curve a device has before anything is known of it or of its peers: one second an image.
PRIOR_PER_IMAGE = 1.0


@dataclass(frozen=True)
class Timing:
    """One pipeline call as the image generator timed it: the call alone, not loading or saving."""

    images: int
    seconds: float
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class Curve:
    """Seconds one pipeline call of n images takes: fixed + per_image * max(n, knee)."""

    fixed: float
    per_image: float
    knee: float = 1.0
    calls: int = 0  # how many timed calls it rests on; 0 for a prior (a guess)
    sizes: int = 0  # how many distinct call sizes were seen
    # "learned", "peers" (borrowed from other devices), "models" (from the device's other models) or "prior"
    source: str = "learned"

    def cost(self, images: int) -> float:
        if images <= 0:
            return 0.0
        return self.fixed + self.per_image * max(float(images), self.knee)

    def work(self, images: int, batch: int) -> float:
        """Seconds to make `images` images in calls of at most `batch` (the best size, normally)."""
        if images <= 0:
            return 0.0
        batch = max(1, batch)
        full, rest = divmod(images, batch)
        # No cost(batch) where no call is full: placement asks this of every device in its turn.
        return (full * self.cost(batch) if full else 0.0) + self.cost(rest)

    def throughput(self, images: int) -> float:
        cost = self.cost(images)
        return images / cost if cost > 0 else math.inf

    def best_size(self, limit: int) -> int:
        """The smallest call that reaches BEST_SHARE of the throughput of a call of `limit`."""
        limit = max(1, limit)
        top = self.throughput(limit)
        if math.isinf(top):
            return limit  # free calls (a zero-second simulated model): fill them
        for size in range(1, limit + 1):
            if self.throughput(size) >= BEST_SHARE * top:
                return size
        return limit

    def describe(self, limit: int) -> str:
        """'1.23 s a call up to 7 images, + 0.171 s per image above; best at 8 (rests on 40 calls)'."""
        floor = self.cost(1)
        if self.knee > 1.01:
            text = f"{floor:.2f} s a call up to {self.knee:g} images, + {self.per_image:.3f} s per image above"
        elif self.fixed >= 0.005:
            text = f"{self.fixed:.2f} s + {self.per_image:.3f} s per image"
        else:
            text = f"{self.per_image:.3f} s per image"
        best = f"best at {self.best_size(limit)}"
        if self.source == "learned":
            rests = f"rests on {self.calls} call{'s' if self.calls != 1 else ''}"
        elif self.source == "peers":
            rests = "no calls of its own yet: borrowed from its peers"
        elif self.source == "models":
            rests = "no calls of this model yet: as its other models cost"
        else:
            rests = "no calls timed yet: a guess"
        return f"{text}; {best} ({rests})"


PRIOR = Curve(fixed=0.0, per_image=PRIOR_PER_IMAGE, knee=1.0, calls=0, sizes=0, source="prior")


def _medians(observations: Iterable[tuple[int, float]]) -> list[tuple[int, float, int]]:
    """(size, median seconds of its RECENT_PER_SIZE latest calls, count); observations newest first."""
    by_size: dict[int, list[float]] = {}
    for size, seconds in observations:
        if size < 1 or not math.isfinite(seconds) or seconds < 0:
            continue
        kept = by_size.setdefault(int(size), [])
        if len(kept) < RECENT_PER_SIZE:
            kept.append(float(seconds))
    return [(size, median(values), len(values)) for size, values in sorted(by_size.items())]


def _line(points: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Weighted least squares y = a + b x with a, b >= 0; returns (a, b, weighted squared error)."""
    sw = sum(w for _, _, w in points)
    mx = sum(w * x for x, _, w in points) / sw
    my = sum(w * y for _, y, w in points) / sw
    sxx = sum(w * (x - mx) ** 2 for x, _, w in points)
    b = 0.0 if sxx <= 1e-12 else max(0.0, sum(w * (x - mx) * (y - my) for x, y, w in points) / sxx)
    a = my - b * mx
    if a < 0:
        # Through the origin instead: a negative fixed cost means nothing physical.
        a = 0.0
        sxx0 = sum(w * x * x for x, _, w in points)
        b = max(0.0, sum(w * x * y for x, y, w in points) / sxx0) if sxx0 > 0 else 0.0
    error = sum(w * (a + b * x - y) ** 2 for x, y, w in points)
    return a, b, error


def fit(observations: Iterable[tuple[int, float]]) -> Curve | None:
    """Fit a curve to (images, seconds) calls, newest first; None when nothing usable was given.

    One call size alone says nothing of the slope: the curve is then a line through zero, which
    errs towards small calls until a calibration or a bigger call shows the real shape.
    """
    medians = _medians(observations)
    if not medians:
        return None
    calls = sum(count for _, _, count in medians)
    if len(medians) == 1:
        size, seconds, _ = medians[0]
        return Curve(fixed=0.0, per_image=seconds / size, knee=1.0, calls=calls, sizes=1)
    # Relative errors: a 2 s call and a 0.2 s call count alike; more calls, more weight.
    weights = [count / max(seconds, 1e-6) ** 2 for _, seconds, count in medians]
    largest = medians[-1][0]
    best: tuple[float, float, float, float] | None = None
    knee = 1.0
    while knee <= largest:
        points = [(max(float(size), knee), seconds, w) for (size, seconds, _), w in zip(medians, weights, strict=True)]
        a, b, error = _line(points)
        # A knee must earn its place: keep the smallest one within 1 % of the best error.
        if best is None or error < best[3] * 0.99 - 1e-15:
            best = (knee, a, b, error)
        knee += 0.5
    assert best is not None
    knee, a, b, _ = best
    if b <= 0:
        # Every size cost the same: no slope could be seen. Spread the cost over the largest call.
        b, a, knee = medians[-1][1] / largest, 0.0, float(largest)
    return Curve(fixed=a, per_image=b, knee=knee, calls=calls, sizes=len(medians))


def peer_curve(curves: Sequence[Curve]) -> Curve:
    """What a device nobody has timed yet may be assumed to cost: the median of its peers' curves
    (each coefficient on its own), or the prior when it has no peers."""
    learned = [c for c in curves if c.source == "learned" and c.calls]
    if not learned:
        return PRIOR
    return Curve(
        fixed=median(c.fixed for c in learned),
        per_image=median(c.per_image for c in learned),
        knee=median(c.knee for c in learned),
        calls=0,
        sizes=0,
        source="peers",
    )


def scaled(curve: Curve, factor: float) -> Curve:
    """The same curve for calls `factor` times as long (another step count of the same model)."""
    return Curve(
        fixed=curve.fixed * factor,
        per_image=curve.per_image * factor,
        knee=curve.knee,
        calls=curve.calls,
        sizes=curve.sizes,
        source=curve.source,
    )
