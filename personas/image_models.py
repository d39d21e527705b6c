"""Image models as data: which model a persona's request uses, and what the request records of it.

A request records its model's fields as they are when it is made (`spec_of`): the worker loads
exactly that, whatever its own settings say, and a model edited or a persona switched to another
model mid-request does not change a running request. SAMPLES_MODEL, SAMPLES_STEPS and
SAMPLES_GUIDANCE only seed the default model, on first migrate (or whenever no model is the
default: `default_model`). The scheduler knows a model by its key alone (`model_key`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models.deletion import ProtectedError

from gpuscheduler.conf import samples_config
from personas.model_sources import SIMULATED_PREFIXES, ModelDirectoryMissing, ModelError, parse_model
from personas.models import ImageModel, Persona

log = logging.getLogger(__name__)

# What changes a model's pipeline or the cost of its calls: a model whose key changed is a new
# model to the workers' pipeline caches, the cost curves and placement's model affinity.
KEY_FIELDS = ("source", "dtype", "width", "height", "scheduler", "safety_checker")
# What a request records of its model (SampleRequest.model_spec).
SPEC_FIELDS = ("name", *KEY_FIELDS, "steps", "guidance_scale")


# pg_advisory_xact_lock(DEFAULT_LOCK): "choosing the default model", held until the transaction ends.
DEFAULT_LOCK = 0x6D646566
SIZE_RANGE = (64, 2048)


class ModelUnavailable(Exception):
    """The persona's model takes no requests now (disabled); the message says what to do."""


class ModelNotDeletable(Exception):
    """The model is the default or some persona's model; the message says what to do first."""


def model_key(fields: dict[str, Any]) -> str:
    """'name@digest': readable, and different whenever a field of KEY_FIELDS is."""
    recipe = json.dumps({name: fields.get(name) for name in KEY_FIELDS}, sort_keys=True)
    return f"{fields['name']}@{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def spec_of(image_model: ImageModel) -> dict[str, Any]:
    """What a request records of its model: every field the worker needs, and the model's key."""
    spec = {name: getattr(image_model, name) for name in SPEC_FIELDS}
    spec["key"] = model_key(spec)
    return spec


def seed_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The default model's fields, from SAMPLES_MODEL, SAMPLES_STEPS and SAMPLES_GUIDANCE."""
    source = str(config["MODEL"]).strip()
    return {
        "name": seed_name(source),
        "source": source,
        "steps": int(config["STEPS"]),
        "guidance_scale": float(config["GUIDANCE"]),
        "is_default": True,
    }


def seed_name(source: str) -> str:
    """A readable name for a model made from SAMPLES_MODEL: 'tiny', 'simulated-0.5', 'sd-v1-5'."""
    tail = source.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-._")[:80]
    return name or "default"


def _default_turn() -> None:
    """Wait for this transaction's turn to choose the default model, and keep it until the
    transaction ends. Without it, two admins making two models the default at once both unset the
    old one and the second save breaks the one-default constraint: PostgreSQL's READ COMMITTED lets
    a statement that waited on a row lock miss the row the other transaction made the default, and
    the statement after the turn sees it. Nothing on SQLite, whose IMMEDIATE transactions
    serialize writers."""
    connection = transaction.get_connection()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [DEFAULT_LOCK])


def default_model() -> ImageModel:
    """The default model, made from the settings when no model is the default (a fresh or emptied
    table): two processes that make it at once end with one."""
    found = ImageModel.objects.filter(is_default=True).first()
    if found is not None:
        return found
    fields = seed_fields(samples_config())
    try:
        with transaction.atomic():
            _default_turn()
            made, created = ImageModel.objects.get_or_create(name=fields.pop("name"), defaults=fields)
            if not created and not made.is_default:
                ImageModel.objects.filter(pk=made.pk).update(is_default=True)
                made.is_default = True
    except IntegrityError:
        # Another process made (or chose) the default at the same moment.
        return ImageModel.objects.get(is_default=True)
    if created:
        log.info("no model was the default: made %s (%s) from SAMPLES_MODEL", made.name, made.source)
    return made


def model_for(persona: Persona, *, override: ImageModel | None = None) -> ImageModel:
    """The model a new request of this persona uses: `override` (a command's --model), else its
    own, else the default; as the row is now."""
    if override is not None:
        chosen = ImageModel.objects.filter(pk=override.pk).first()
        if chosen is None:
            raise ModelUnavailable(f"The model {override.name} was deleted: choose another model.")
        if not chosen.enabled:
            raise ModelUnavailable(
                f"The model {chosen.name} is disabled, so it takes no requests: enable it in Image models, "
                "or choose another model."
            )
        return chosen
    chosen = persona.image_model or default_model()
    if not chosen.enabled:
        raise ModelUnavailable(
            f"The model {chosen.name} is disabled, so it takes no requests: enable it in Image models, "
            f"or choose another model for {persona.name}."
        )
    return chosen


def model_named(name: str) -> ImageModel:
    """An enabled model by its name (a command's --model); ModelUnavailable says what exists."""
    chosen = ImageModel.objects.filter(name=name).first() if name.isprintable() and len(name) <= 80 else None
    if chosen is None:
        known = ", ".join(ImageModel.objects.filter(enabled=True).values_list("name", flat=True)) or "none"
        shown = name if name.isprintable() and len(name) <= 80 else repr(name[:80])
        raise ModelUnavailable(f"Unknown model {shown}: name one of the enabled models ({known}).")
    if not chosen.enabled:
        raise ModelUnavailable(
            f"The model {chosen.name} is disabled, so it takes no requests: enable it in Image models, "
            "or name another model."
        )
    return chosen


def spec_name(spec: dict[str, Any], key: str) -> str:
    """A request's model as people know it: its recorded name, else its key before '@'."""
    name = spec.get("name") if isinstance(spec, dict) else None
    return str(name) if name else key.split("@", 1)[0]


# --- the admin's checks and writes ----------------------------------------------------------------


def source_check(text: str) -> str:
    """A model source as it will be stored, checked as a worker would read it (without torch): a
    local folder is stored as its absolute path, which every worker reads alike."""
    text = text.strip()
    if not text.isprintable():
        raise ValidationError("The source holds control characters: type it on one line.", code="invalid")
    try:
        parsed = parse_model(text)
    except ModelDirectoryMissing:
        folder = Path(text).expanduser()
        if not folder.exists():
            raise ValidationError(
                f"{text} does not exist on this machine: give the absolute path of a diffusers model folder "
                "(the folder that holds model_index.json).",
                code="missing",
            ) from None
        raise ValidationError(
            f"{text} has no model_index.json, so it is not a diffusers model: point the source at the folder "
            "saved with save_pretrained() (the one that holds model_index.json).",
            code="not_diffusers",
        ) from None
    except (ModelError, OSError, ValueError):
        prefix = next((p for p in SIMULATED_PREFIXES if text.startswith(p)), None)
        if prefix is not None:
            message = f"The seconds after '{prefix}' must be a number from 0 to 3600, like '{prefix}0.5'."
        else:
            message = (
                f"'{text[:100]}' is not a model source: use 'tiny', 'simulated:SECONDS', 'simulated-h100:SECONDS', "
                "the absolute path of a diffusers folder (with model_index.json) or a hub id like "
                "'owner/model' (loaded from the local Hugging Face cache)."
            )
        raise ValidationError(message, code="invalid") from None
    source = parsed.value if parsed.kind == "local" else text
    limit = ImageModel._meta.get_field("source").max_length or 300
    if len(source) > limit:
        raise ValidationError(
            f"The source is {len(source)} characters long, over the {limit} a model may have: move the "
            "model to a shorter path.",
            code="max_length",
        )
    return source


def size_errors(width: int | None, height: int | None) -> dict[str, str]:
    """What is wrong with an image size, by field: both or neither, multiples of 8 in 64..2048."""
    low, high = SIZE_RANGE
    errors: dict[str, str] = {}
    for field, value in (("width", width), ("height", height)):
        if value is not None and (value % 8 or not low <= value <= high):
            errors[field] = (
                f"{value} is not a size a diffusion model takes: give a multiple of 8 from {low} to {high}, "
                f"like 512 (or leave width and height empty for the model's own size)."
            )
    if (width is None) != (height is None):
        missing = "height" if height is None else "width"
        errors.setdefault(
            missing,
            f"Give the {missing} too, or leave both width and height empty for the model's own size.",
        )
    return errors


def image_model_save(*, image_model: ImageModel) -> None:
    """Save a model; one made the default takes over from the previous default in the same
    transaction, so there is always exactly one."""
    with transaction.atomic():
        if image_model.is_default:
            _default_turn()
            ImageModel.objects.filter(is_default=True).exclude(pk=image_model.pk).update(is_default=False)
        image_model.save()


def image_model_delete_refusal(*, image_model: ImageModel) -> str | None:
    """Why this model cannot be deleted now, and what to do first; None when it can."""
    if image_model.is_default:
        return (
            f"The model {image_model.name} is the default, so it cannot be deleted: make another model the "
            "default first (tick Default on it), then delete this one."
        )
    names = list(image_model.personas.order_by("name").values_list("name", flat=True)[:4])
    if names:
        total = image_model.personas.count()
        shown = ", ".join(names[:3]) + (f" and {total - 3} more" if total > 3 else "")
        return (
            f"The model {image_model.name} is chosen by {total} persona(s) ({shown}), so it cannot be deleted: "
            "choose another model for them first (an empty Model means the default)."
        )
    return None


def image_models_delete(*, image_models: list[ImageModel]) -> int:
    """Delete models that are neither the default nor any persona's; ModelNotDeletable (and
    nothing deleted) when one of them is."""
    with transaction.atomic():
        _default_turn()  # a model made the default meanwhile is seen as the default
        fresh = list(ImageModel.objects.filter(pk__in=[m.pk for m in image_models]))
        for image_model in fresh:
            refusal = image_model_delete_refusal(image_model=image_model)
            if refusal is not None:
                raise ModelNotDeletable(refusal)
        try:
            deleted, _ = ImageModel.objects.filter(pk__in=[m.pk for m in fresh]).delete()
        except ProtectedError as exc:  # a persona chose one of them since the check
            raise ModelNotDeletable(
                "A persona chose one of these models a moment ago, so nothing was deleted: choose another "
                "model for it first."
            ) from exc
    return deleted


def legacy_spec(model: str, steps: int) -> dict[str, Any]:
    """The spec of a request made before models were data: its model string, with the settings'
    guidance, the model's own size and scheduler, no safety checker (what workers did then)."""
    return {
        "name": seed_name(model),
        "source": model,
        "dtype": "auto",
        "width": None,
        "height": None,
        "scheduler": "",
        "safety_checker": False,
        "steps": steps,
        "guidance_scale": float(samples_config()["GUIDANCE"]),
        "key": model,
    }
