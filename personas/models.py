from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

from gpuscheduler.clock import DbNow

MAX_SEED = 2**32 - 1

slug_validator = RegexValidator(
    r"^[a-z0-9]+(?:-[a-z0-9]+)*$",
    "Use lowercase letters, digits and single hyphens (e.g. 'ada-lovelace').",
)


class Dtype(models.TextChoices):
    AUTO = "auto", "Automatic (float16 on a GPU, float32 on the CPU)"
    FLOAT16 = "float16", "float16"
    BFLOAT16 = "bfloat16", "bfloat16"
    FLOAT32 = "float32", "float32"


# The schedulers diffusers ships (diffusers.schedulers), by class name: the web process never
# imports diffusers (nor torch), so they are listed here; a test checks each against diffusers.
SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "TCDScheduler",
    "UniPCMultistepScheduler",
)

model_name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
    "Use letters, digits, dots, hyphens and underscores, starting with a letter or digit (e.g. 'sd15-512').",
)


class ImageModel(models.Model):
    """An image model, as data: where its weights come from and how its images are made.

    A request records the model's fields as they are when it is made (SampleRequest.model_spec),
    and the worker loads exactly that, whatever its own settings say. The scheduler knows a
    model by its key (name and a digest of what makes its pipeline and its cost), so a changed
    source, dtype, scheduler or size is a new model to the pipeline caches and the cost curves.
    """

    name = models.CharField(max_length=80, unique=True, validators=[model_name_validator])
    source = models.CharField(
        max_length=300,
        help_text="'tiny' (built in, random weights), 'simulated:SECONDS' or 'simulated-h100:SECONDS' (no "
        "diffusion), an absolute path to a diffusers folder (with model_index.json), or a hub id like "
        "'owner/model' (loaded from the local Hugging Face cache only).",
    )
    dtype = models.CharField(max_length=16, choices=Dtype.choices, default=Dtype.AUTO)
    width = models.PositiveIntegerField(
        null=True, blank=True, help_text="Pixels, a multiple of 8 from 64 to 2048; empty: the model's own size."
    )
    height = models.PositiveIntegerField(
        null=True, blank=True, help_text="Pixels, a multiple of 8 from 64 to 2048; empty: the model's own size."
    )
    steps = models.PositiveIntegerField(default=25, validators=[MinValueValidator(1), MaxValueValidator(500)])
    guidance_scale = models.FloatField(default=7.5, validators=[MinValueValidator(0), MaxValueValidator(50)])
    scheduler = models.CharField(
        max_length=64,
        blank=True,
        choices=[(name, name) for name in SCHEDULERS],
        help_text="Empty: the scheduler the model was saved with.",
    )
    safety_checker = models.BooleanField(
        default=True,
        help_text="Run the pipeline's safety checker, where the model has one (it blanks images it flags).",
    )
    enabled = models.BooleanField(default=True, help_text="Disabled models take no new requests.")
    is_default = models.BooleanField(
        default=False, help_text="Used by personas that name no model (exactly one model is the default)."
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["is_default"], condition=Q(is_default=True), name="imagemodel_one_default"),
        ]

    def __str__(self) -> str:
        return self.name


class Persona(models.Model):
    name = models.CharField(max_length=150)
    slug = models.SlugField(max_length=80, unique=True, validators=[slug_validator])
    description = models.TextField(blank=True, max_length=5000)
    appearance_prompt = models.TextField(
        max_length=2000, help_text="What the persona looks like; the prompt for its sample images."
    )
    negative_prompt = models.TextField(blank=True, max_length=2000)
    image_model = models.ForeignKey(
        ImageModel,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="personas",
        verbose_name="model",
        help_text="Empty: the default model.",
    )
    default_sample_count = models.PositiveSmallIntegerField(
        default=4, validators=[MinValueValidator(1), MaxValueValidator(1024)]
    )
    base_seed = models.BigIntegerField(
        default=0,
        validators=[MinValueValidator(0), MaxValueValidator(MAX_SEED)],
        help_text="Image k of every batch gets a recorded seed counted on from this one.",
    )
    images_requested = models.PositiveIntegerField(
        default=0, editable=False, help_text="Images ever requested; the next batch's seeds start after them."
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class RequestState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_REQUEST_STATES = (RequestState.QUEUED, RequestState.RUNNING)


class RequestSource(models.TextChoices):
    ADMIN = "admin", "Admin button"
    ACTION = "action", "Admin action"
    COMMAND = "command", "regenerate_samples"


class SampleRequest(models.Model):
    """One press of Generate sample images (or one persona of a bulk command)."""

    persona = models.ForeignKey(Persona, on_delete=models.CASCADE, related_name="requests")
    count = models.PositiveIntegerField()
    device = models.ForeignKey(
        "gpuscheduler.Device",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="An explicit device choice, which bypasses the policy.",
    )
    state = models.CharField(max_length=16, choices=RequestState.choices, default=RequestState.QUEUED)
    source = models.CharField(max_length=16, choices=RequestSource.choices, default=RequestSource.ADMIN)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    first_seed = models.BigIntegerField()
    # The model as it was when the request was made: its key (what the scheduler knows it by),
    # the row it came from, and every field the worker needs to load and run it.
    model = models.CharField(max_length=300)
    image_model = models.ForeignKey(ImageModel, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model_spec = models.JSONField(default=dict, blank=True)
    steps = models.PositiveIntegerField()
    error = models.TextField(blank=True)
    # The database's clock: the reconciler compares it with its own time (gpuscheduler/clock.py).
    created = models.DateTimeField(db_default=DbNow(), editable=False)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        constraints = [
            # A double click, or two admins at once, gets "already queued", not a second batch.
            models.UniqueConstraint(
                fields=["persona"],
                condition=Q(state__in=["queued", "running"]),
                name="request_one_active_per_persona",
            ),
        ]
        indexes = [models.Index(fields=["state", "created"], name="request_state_created")]

    def __str__(self) -> str:
        return f"{self.count} images of {self.persona} ({self.get_state_display()})"

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_REQUEST_STATES

    def seed_for(self, index: int) -> int:
        return (self.first_seed + index) % (MAX_SEED + 1)


class SampleImage(models.Model):
    persona = models.ForeignKey(Persona, on_delete=models.CASCADE, related_name="sample_images")
    request = models.ForeignKey(SampleRequest, null=True, blank=True, on_delete=models.SET_NULL, related_name="images")
    assignment = models.ForeignKey(
        "gpuscheduler.Assignment", null=True, blank=True, on_delete=models.SET_NULL, related_name="images"
    )
    index = models.PositiveIntegerField(help_text="Position in its request.")
    image = models.ImageField(max_length=255)
    # Its thumbnail beside it in the samples storage (personas/thumbnails.py); empty: none was made.
    thumbnail = models.CharField(max_length=255, blank=True, default="")
    seed = models.BigIntegerField()
    prompt = models.TextField()
    negative_prompt = models.TextField(blank=True)
    width = models.PositiveIntegerField(default=0)
    height = models.PositiveIntegerField(default=0)
    model = models.CharField(max_length=300)
    steps = models.PositiveIntegerField(default=0)
    device = models.ForeignKey(
        "gpuscheduler.Device", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created", "index"]
        constraints = [
            # The last line of defence against a doubled image: one row per position of a request.
            models.UniqueConstraint(fields=["request", "index"], name="image_unique_request_index"),
        ]
        # The persona list's newest thumbnail per persona, and the gallery's pages.
        indexes = [models.Index(fields=["persona", "-id"], name="image_persona_newest")]

    def __str__(self) -> str:
        return f"{self.persona} #{self.index} (seed {self.seed})"
