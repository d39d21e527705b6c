# Stable identity (issue 8): a device is keyed by its UUID alone, CPU rows get a UUID that names
# their host, retired devices, and a Host row per machine for its monitor's heartbeat.

from django.db import migrations, models


def _seen(device):
    """When anyone last heard of the device (its newest reading, heartbeat or registration)."""
    return max(t for t in (device.last_seen, device.worker_seen_at, device.created) if t is not None)


def unique_uuids(apps, schema_editor):
    """Make Device.uuid unique before the constraint is added.

    CPU rows were all "cpu" (one per host): each becomes "CPU-<host>", as the CPU backend names it
    now. A GPU reported under several host names (a container restarted with a new hostname) had a
    row per name: the most recently seen row is kept, and everything that points at the others
    (attempts, snapshots, images, requests) is moved to it, so no history is lost.
    """
    Device = apps.get_model("gpuscheduler", "Device")
    db = schema_editor.connection.alias
    taken = set(Device.objects.using(db).exclude(uuid="cpu").values_list("uuid", flat=True))
    for device in Device.objects.using(db).filter(uuid="cpu").order_by("pk"):
        uuid = f"CPU-{device.host}"[:96]
        if uuid in taken:
            uuid = f"CPU-{device.pk}"
        taken.add(uuid)
        Device.objects.using(db).filter(pk=device.pk).update(uuid=uuid)

    duplicated = (
        Device.objects.using(db)
        .values("uuid")
        .annotate(rows=models.Count("id"))
        .filter(rows__gt=1)
        .values_list("uuid", flat=True)
    )
    # Every foreign key to Device in the migration state. The state holds every app's applied
    # migrations, so the personas tables (images, requests) are in it whenever rows exist at all.
    relations = [
        (rel.related_model, rel.field.name)
        for rel in Device._meta.related_objects
        if rel.field.many_to_one
    ]
    for uuid in list(duplicated):
        rows = sorted(Device.objects.using(db).filter(uuid=uuid), key=lambda d: (_seen(d), d.pk))
        keep, others = rows[-1], [d.pk for d in rows[:-1]]
        for model, field in relations:
            model._base_manager.using(db).filter(**{f"{field}__in": others}).update(**{field: keep.pk})
        Device.objects.using(db).filter(pk__in=others).delete()
    if schema_editor.connection.vendor == "postgresql":
        # The foreign keys are DEFERRABLE INITIALLY DEFERRED: run their checks now, or PostgreSQL
        # refuses the ALTER TABLE below ("it has pending trigger events").
        schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        schema_editor.execute("SET CONSTRAINTS ALL DEFERRED")


class Migration(migrations.Migration):

    dependencies = [
        ('gpuscheduler', '0003_media_store'),
    ]

    operations = [
        migrations.CreateModel(
            name='Host',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('host', models.CharField(help_text='The host id (GPU_HOST).', max_length=255, unique=True)),
                ('hostname', models.CharField(blank=True, help_text="The machine's name when its monitor last ran.", max_length=255)),
                ('monitor_pid', models.PositiveIntegerField(blank=True, null=True)),
                ('monitor_started_at', models.DateTimeField(blank=True, null=True)),
                ('monitor_seen_at', models.DateTimeField(blank=True, null=True)),
                ('version', models.CharField(blank=True, help_text='The project version its monitor runs.', max_length=64)),
                ('created', models.DateTimeField(auto_now_add=True)),
            ],
            options={
                'ordering': ['host'],
            },
        ),
        migrations.AddField(
            model_name='device',
            name='retired_at',
            field=models.DateTimeField(blank=True, help_text='Set once nothing was heard of it for GPU_RETIRE_AFTER_HOURS: hidden from placement and the status page, kept for history; cleared when it is seen again.', null=True),
        ),
        migrations.AddField(
            model_name='device',
            name='worker_host',
            field=models.CharField(blank=True, help_text="The host id of its worker's process: its PID means something only there.", max_length=255),
        ),
        migrations.AlterField(
            model_name='device',
            name='host',
            field=models.CharField(help_text='The host id (GPU_HOST) of the host that last reported it.', max_length=255),
        ),
        migrations.RemoveConstraint(
            model_name='device',
            name='device_unique_host_uuid',
        ),
        migrations.RunPython(unique_uuids, migrations.RunPython.noop, elidable=True),
        migrations.AlterField(
            model_name='device',
            name='uuid',
            field=models.CharField(max_length=96, unique=True),
        ),
    ]
