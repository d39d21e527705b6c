"""The attempts a worker makes in one pipeline call: the one it popped, and the queued attempts of
other requests with the same model, steps and guidance that gpuscheduler/batching.py claims to fill
the call. The call is made from the model the requests recorded (SampleRequest.model_spec), not
from the worker's settings.

Each image keeps its own request's prompt, negative prompt and seed, whatever call it is made in;
each attempt keeps its own claim, and the call's attempts commit in one transaction in which each
wins or loses on its own (personas/commit.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuscheduler import batching
from gpuscheduler.conf import samples_config
from gpuscheduler.models import Assignment
from personas.image_models import legacy_spec
from personas.imagegen import GenerationResult, Prompt
from personas.models import SampleRequest
from personas.services import sample_requests_mark_started

if TYPE_CHECKING:
    from gpuscheduler.heartbeat import WorkerContext


def request_spec(request: SampleRequest) -> dict[str, Any]:
    """The model the request recorded; a request made before models were data gets its legacy spec."""
    return request.model_spec or legacy_spec(request.model, request.steps)


def same_call(request: SampleRequest) -> dict[str, Any]:
    """What another request's attempt must share with `request` to join its call: the model's key
    (which covers the pipeline and the image size) and steps, and the guidance, which is no part of
    the key: a model's guidance edited between two requests keeps their calls apart."""
    match: dict[str, Any] = {"request__model": request.model, "request__steps": request.steps}
    if request.model_spec:
        match["request__model_spec__guidance_scale"] = request.model_spec.get("guidance_scale")
    else:
        match["request__model_spec__guidance_scale__isnull"] = True  # made before models were data
    return match


@dataclass(frozen=True)
class Member:
    """One attempt of a call, with its request (and persona) loaded."""

    assignment: Assignment
    request: SampleRequest

    def prompts(self) -> list[Prompt]:
        persona = self.request.persona
        return [
            Prompt(self.request.seed_for(index), persona.appearance_prompt, persona.negative_prompt)
            for index in self.assignment.indexes
        ]


def batch_gather(*, first: Assignment, request: SampleRequest, context: WorkerContext) -> list[Member]:
    """Claim the queued attempts that share `first`'s call (none, often) and mark every member's
    request started; returns `first` and them, in the call's order."""
    config = samples_config()
    members = [Member(first, request)]
    if config["BATCHING"]:  # SAMPLES_BATCHING=0: one chunk per call (to measure what batching brings)
        claimed = batching.call_fill(
            first=first,
            context=context,
            model=request.model,
            steps=request.steps,
            match=same_call(request),
            timeout=float(config["JOB_TIMEOUT"]),
            wait=int(config["BATCH_WAIT_MS"]) / 1000,
        )
        partners = [a for a in claimed[1:] if a.request_id]
        if partners:
            requests = SampleRequest.objects.select_related("persona").in_bulk([a.request_id for a in partners])
            members += [Member(a, requests[a.request_id]) for a in partners]
    sample_requests_mark_started(request_ids=[member.request.pk for member in members])
    return members


def batch_generate(members: list[Member], *, context: WorkerContext) -> GenerationResult:
    """Make every member's images in one call (more where memory runs out), in members' order, with
    the model, steps and guidance the first member's request recorded (the others match them)."""
    request = members[0].request
    spec = request_spec(request)
    call: dict[str, Any] = {
        "model": spec,
        "steps": request.steps,
        "guidance": float(spec["guidance_scale"]),
        "alive": context.alive,
    }
    prompts = [prompt for member in members for prompt in member.prompts()]
    if len({(p.prompt, p.negative_prompt) for p in prompts}) == 1:
        # One persona's prompt for every image: the plain form, as for an attempt alone.
        result: GenerationResult = context.generator.generate(
            prompt=prompts[0].prompt,
            negative_prompt=prompts[0].negative_prompt,
            seeds=[p.seed for p in prompts],
            **call,
        )
    else:
        result = context.generator.generate(items=prompts, **call)
    if len(result.images) != len(prompts):
        raise RuntimeError(f"the call made {len(result.images)} images for {len(prompts)} prompts")
    return result
