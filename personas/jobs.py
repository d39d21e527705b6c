"""RQ jobs: module-level functions that take ids, reload state and call one service."""

from __future__ import annotations

from typing import Any

from gpuscheduler.heartbeat import current_context
from personas.attempts import sample_assignment_run


def generate_samples(assignment_id: int) -> dict[str, Any]:
    """Make one attempt's images on the device of the worker that runs it, in one call with the
    queued attempts of other requests that can share it (personas/batch.py)."""
    return sample_assignment_run(assignment_id=int(assignment_id), context=current_context())
