from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

from gpuscheduler.clock import DbNow


class DeviceKind(models.TextChoices):
    CUDA = "cuda", "CUDA GPU"
    CPU = "cpu", "CPU"
    SIMULATED = "simulated", "Simulated GPU"


class Health(models.TextChoices):
    HEALTHY = "healthy", "Healthy"
    PROBATION = "probation", "Probation"
    UNHEALTHY = "unhealthy", "Unhealthy"


class WorkerState(models.TextChoices):
    STARTING = "starting", "Starting (loading the model)"
    IDLE = "idle", "Idle"
    BUSY = "busy", "Busy"
    PAUSED = "paused", "Paused (device not admitted)"
    STOPPED = "stopped", "Stopped"


class Device(models.Model):
    """One GPU (or the CPU) of the cluster, keyed by its UUID alone.

    A GPU's UUID (NVML's) is globally unique, so a restarted container or a renamed host
    re-attaches to the same row and `host` follows the GPU; CPU and simulated UUIDs include the
    host id (GPU_HOST), which makes them unique too.
    """

    host = models.CharField(max_length=255, help_text="The host id (GPU_HOST) of the host that last reported it.")
    uuid = models.CharField(max_length=96, unique=True)
    name = models.CharField(max_length=200)
    index = models.PositiveIntegerField(null=True, blank=True, help_text="NVML index (not CUDA's).")
    pci_bus_id = models.CharField(max_length=64, blank=True)
    memory_total = models.BigIntegerField(default=0, help_text="Bytes.")
    kind = models.CharField(max_length=16, choices=DeviceKind.choices)
    health = models.CharField(max_length=16, choices=Health.choices, default=Health.PROBATION)
    health_reason = models.CharField(max_length=500, blank=True)
    health_changed_at = models.DateTimeField(null=True, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    worker_name = models.CharField(max_length=200, blank=True)
    worker_pid = models.PositiveIntegerField(null=True, blank=True)
    worker_host = models.CharField(
        max_length=255, blank=True, help_text="The host id of its worker's process: its PID means something only there."
    )
    worker_state = models.CharField(max_length=16, choices=WorkerState.choices, default=WorkerState.STOPPED)
    worker_seen_at = models.DateTimeField(null=True, blank=True)
    current_assignment = models.ForeignKey(
        "gpuscheduler.Assignment", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    retired_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Set once nothing was heard of it for GPU_RETIRE_AFTER_HOURS: hidden from placement and the "
        "status page, kept for history; cleared when it is seen again.",
    )
    # The latest reading, copied from its newest snapshot when it is stored: placement reads the
    # device rows alone, whatever the size of the snapshot history.
    reading_at = models.DateTimeField(null=True, blank=True)
    memory_used = models.BigIntegerField(null=True, blank=True, help_text="Bytes, at the latest reading.")
    utilization = models.FloatField(null=True, blank=True, help_text="%, at the latest reading.")
    temperature = models.FloatField(null=True, blank=True, help_text="Degrees C, at the latest reading.")
    # The database's clock: stale_seconds compares it with times other hosts wrote (gpuscheduler/clock.py).
    created = models.DateTimeField(db_default=DbNow(), editable=False)

    class Meta:
        ordering = ["host", "index", "uuid"]

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        if self.kind == DeviceKind.CPU:
            return f"CPU ({self.host})"
        prefix = "SIM" if self.kind == DeviceKind.SIMULATED else "GPU"
        return f"{prefix} {self.index} {self.name}"

    @property
    def short_uuid(self) -> str:
        return self.uuid.removeprefix("GPU-").removeprefix("SIM-").removeprefix("CPU-")[:8]


class Host(models.Model):
    """One machine of the cluster, keyed by its stable host id (GPU_HOST): its monitor's heartbeat.

    Workers beat on their Device rows; the monitor has no device of its own, so it beats here.
    """

    host = models.CharField(max_length=255, unique=True, help_text="The host id (GPU_HOST).")
    hostname = models.CharField(max_length=255, blank=True, help_text="The machine's name when its monitor last ran.")
    monitor_pid = models.PositiveIntegerField(null=True, blank=True)
    monitor_started_at = models.DateTimeField(null=True, blank=True)
    monitor_seen_at = models.DateTimeField(null=True, blank=True)
    version = models.CharField(max_length=64, blank=True, help_text="The project version its monitor runs.")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["host"]

    def __str__(self) -> str:
        return self.host


class MediaStore(models.Model):
    """The media folder of one host (sample PNGs are written under DATA_DIR/media of the host that
    made them): its latest reading, a health input like a GPU's memory. Healthy while a probe file
    can be written there and free space stays above STORAGE_MIN_FREE_MB."""

    host = models.CharField(max_length=255, unique=True)
    path = models.CharField(max_length=1000, blank=True)
    healthy = models.BooleanField(default=True)
    reason = models.CharField(max_length=500, blank=True)
    free_bytes = models.BigIntegerField(null=True, blank=True)
    total_bytes = models.BigIntegerField(null=True, blank=True)
    checked_at = models.DateTimeField(help_text="When this verdict was reached (a reading or a reported error).")
    changed_at = models.DateTimeField(null=True, blank=True, help_text="When it last turned healthy or unhealthy.")

    class Meta:
        ordering = ["host"]

    def __str__(self) -> str:
        return f"media store of {self.host}"


class Snapshot(models.Model):
    """One reading of one device; `bucket_seconds` > 0 marks a downsampled average."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="snapshots")
    taken_at = models.DateTimeField()
    bucket_seconds = models.PositiveIntegerField(default=0)
    memory_used = models.BigIntegerField(null=True, blank=True, help_text="Bytes, from nvmlDeviceGetMemoryInfo.")
    memory_total = models.BigIntegerField(null=True, blank=True)
    utilization = models.FloatField(null=True, blank=True, help_text="GPU (compute) utilization, %.")
    temperature = models.FloatField(null=True, blank=True, help_text="Degrees C.")
    power_watts = models.FloatField(null=True, blank=True)
    throttle_reasons = models.CharField(max_length=300, blank=True)
    health = models.CharField(max_length=16, choices=Health.choices)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["device", "-taken_at"]
        indexes = [
            models.Index(fields=["device", "taken_at"], name="snapshot_device_time"),
            models.Index(fields=["bucket_seconds", "taken_at"], name="snapshot_bucket_time"),
        ]

    def __str__(self) -> str:
        return f"{self.device} at {timezone.localtime(self.taken_at):%Y-%m-%d %H:%M:%S %Z}"


class PipelineCall(models.Model):
    """One timed pipeline call on one device: the call alone, not loading the model or saving images.

    The worker records every call; its device's cost curve (CostCurve) is fitted from the latest
    ones. Attempts that shared a call (cross-request batching) point at the same row.
    """

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="pipeline_calls")
    model = models.CharField(max_length=300)
    steps = models.PositiveIntegerField()
    width = models.PositiveIntegerField(default=0)
    height = models.PositiveIntegerField(default=0)
    images = models.PositiveIntegerField()
    seconds = models.FloatField()
    calibration = models.BooleanField(default=False, help_text="Made at worker start to seed the curve.")
    at = models.DateTimeField(db_default=DbNow(), editable=False)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["device", "model", "steps", "id"], name="pipelinecall_curve")]

    def __str__(self) -> str:
        return f"{self.images} image(s) in {self.seconds:.2f} s on {self.device}"


class CostCurve(models.Model):
    """What a call of n images costs on one device for one model and step count, as fitted from its
    latest PipelineCall rows: fixed + per_image * max(n, knee) seconds (gpuscheduler/curves.py)."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="cost_curves")
    model = models.CharField(max_length=300)
    steps = models.PositiveIntegerField()
    fixed_seconds = models.FloatField()
    per_image_seconds = models.FloatField()
    knee = models.FloatField(default=1.0)
    calls = models.PositiveIntegerField(default=0, help_text="How many timed calls the fit rests on.")
    sizes = models.PositiveIntegerField(default=0, help_text="How many distinct call sizes it saw.")
    updated_at = models.DateTimeField(db_default=DbNow())

    class Meta:
        ordering = ["device", "model", "steps"]
        constraints = [
            models.UniqueConstraint(fields=["device", "model", "steps"], name="costcurve_one_per_device_model_steps")
        ]

    def __str__(self) -> str:
        return f"{self.device} {self.model} at {self.steps} steps"


class ModelState(models.TextChoices):
    WARM = "warm", "Warm (loaded)"
    EVICTED = "evicted", "Evicted (loaded before)"
    FAILED = "failed", "Failed to load"


class DeviceModel(models.Model):
    """One model on one device, as the device's worker reports it: loaded (warm), evicted from its
    pipeline cache, or out of service there because it failed to load (the device keeps serving
    its other models). `model` is the key requests carry (an opaque string to the scheduler);
    placement prefers a device where the model is warm unless waiting for it costs more than
    loading it elsewhere, by each device's measured load time."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="device_models")
    model = models.CharField(max_length=300)
    state = models.CharField(max_length=16, choices=ModelState.choices)
    reason = models.CharField(max_length=2000, blank=True, help_text="Why it failed to load, when it did.")
    load_seconds = models.FloatField(null=True, blank=True, help_text="Its latest load on this device.")
    loads = models.PositiveIntegerField(default=0, help_text="How many times this device loaded it.")
    memory_bytes = models.BigIntegerField(
        null=True, blank=True, help_text="Device memory it held (released when evicted), as measured."
    )
    loaded_at = models.DateTimeField(null=True, blank=True)
    used_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(db_default=DbNow())

    class Meta:
        ordering = ["device", "model"]
        constraints = [models.UniqueConstraint(fields=["device", "model"], name="devicemodel_one_per_device_model")]

    def __str__(self) -> str:
        return f"{self.model} on {self.device}: {self.get_state_display()}"


class AssignmentKind(models.TextChoices):
    SAMPLES = "samples", "Sample images"
    CANARY = "canary", "Canary"


class AssignmentState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    RETRIED = "retried", "Failed, retried"
    ABANDONED = "abandoned", "Abandoned (worker lost), retried"
    CANCELLED = "cancelled", "Cancelled"


LIVE_STATES = (AssignmentState.QUEUED, AssignmentState.RUNNING)


def images_label(first_index: int, count: int) -> str:
    return f"image {first_index + 1}" if count == 1 else f"images {first_index + 1}-{first_index + count}"


class Assignment(models.Model):
    """One attempt at one chunk of a request's images: where it was placed, where it ran, how it ended.

    A chunk is (request, first_index, image_count). Each retry is a new row with attempt + 1, so the
    history keeps the abandoned attempt beside the one that finished. The row's primary key is the
    attempt token: only the attempt whose row is still RUNNING may commit images.
    """

    kind = models.CharField(max_length=16, choices=AssignmentKind.choices, default=AssignmentKind.SAMPLES)
    request = models.ForeignKey(
        "personas.SampleRequest", null=True, blank=True, on_delete=models.CASCADE, related_name="assignments"
    )
    first_index = models.PositiveIntegerField(default=0)
    image_count = models.PositiveIntegerField()
    attempt = models.PositiveIntegerField(default=1)
    job_id = models.CharField(max_length=64, unique=True)
    queue_name = models.CharField(max_length=100)
    planned_device = models.ForeignKey(Device, on_delete=models.PROTECT, related_name="planned_assignments")
    device = models.ForeignKey(Device, null=True, blank=True, on_delete=models.PROTECT, related_name="ran_assignments")
    pinned = models.BooleanField(default=False)
    avoid_device = models.ForeignKey(
        Device,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The device the previous attempt failed on; its worker hands this one to another device.",
    )
    policy = models.CharField(max_length=40)
    reason = models.CharField(max_length=500)
    worker_name = models.CharField(max_length=200, blank=True)
    host = models.CharField(max_length=255, blank=True)
    state = models.CharField(max_length=16, choices=AssignmentState.choices, default=AssignmentState.QUEUED)
    error = models.TextField(blank=True)
    # The database's clock, like every time of an attempt: the retry window and the reconciler's
    # grace compare it with times written on other hosts (gpuscheduler/clock.py).
    queued_at = models.DateTimeField(db_default=DbNow(), editable=False)
    enqueued_at = models.DateTimeField(null=True, blank=True, help_text="When it reached Redis.")
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    peak_memory = models.BigIntegerField(null=True, blank=True, help_text="Bytes, where known.")
    calls = models.PositiveIntegerField(default=0, help_text="Pipeline calls made.")
    pipeline_call = models.ForeignKey(
        PipelineCall,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="assignments",
        help_text="The pipeline call that made its images; attempts batched together share one.",
    )

    class Meta:
        ordering = ["-queued_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["request", "first_index"],
                condition=Q(state__in=["queued", "running"]),
                name="assignment_one_live_attempt_per_chunk",
            ),
        ]
        indexes = [
            models.Index(fields=["state", "heartbeat_at"], name="assignment_state_heartbeat"),
            models.Index(fields=["planned_device", "state"], name="assignment_planned_state"),
            models.Index(fields=["device", "started_at"], name="assignment_device_started"),
        ]

    def __str__(self) -> str:
        return f"{self.job_id} ({self.get_state_display()})"

    @property
    def indexes(self) -> range:
        """The request's image indexes this attempt makes."""
        return range(self.first_index, self.first_index + self.image_count)

    @property
    def images_label(self) -> str:
        """Which images of its request, counted from 1: "images 1-4" or "image 3"."""
        return images_label(self.first_index, self.image_count)


class GpuStatusPage(models.Model):
    """No table: carries the permission that opens the GPU status page (the django-rq way)."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [("view_gpu_status", "Can view the GPU status page")]
        verbose_name = "GPU status"
        verbose_name_plural = "GPU status"

    def __str__(self) -> str:
        return "GPU status"
