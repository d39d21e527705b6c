# One clock (issue 8): times other hosts compare are the database's, not the writing host's.

from django.db import migrations, models

import gpuscheduler.clock


class Migration(migrations.Migration):
    dependencies = [
        ("gpuscheduler", "0004_cluster_identity"),
    ]

    operations = [
        migrations.AlterField(
            model_name="assignment",
            name="queued_at",
            field=models.DateTimeField(db_default=gpuscheduler.clock.DbNow(), editable=False),
        ),
        migrations.AlterField(
            model_name="device",
            name="created",
            field=models.DateTimeField(db_default=gpuscheduler.clock.DbNow(), editable=False),
        ),
    ]
