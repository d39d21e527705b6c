# One clock (issue 8): a request's creation time is the database's, which the reconciler compares.

from django.db import migrations, models

import gpuscheduler.clock


class Migration(migrations.Migration):
    dependencies = [
        ("personas", "0001_initial"),
    ]

    operations = [
        migrations.AlterField(
            model_name="samplerequest",
            name="created",
            field=models.DateTimeField(db_default=gpuscheduler.clock.DbNow(), editable=False),
        ),
    ]
