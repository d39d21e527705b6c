from __future__ import annotations

import os
import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from personas.image_models import default_model
from personas.models import ImageModel, Persona

# The second demo model: the tiny model at another size (a new key, so a model of its own to the
# workers' caches and placement), given to one demo persona.
SECOND_MODEL = {"name": "tiny-128", "source": "tiny", "width": 128, "height": 128}
SECOND_MODEL_PERSONA = "captain-nova"

DEMO_PERSONAS = [
    {
        "name": "Ada Lovelace",
        "slug": "ada-lovelace",
        "description": "A Victorian mathematician who explains algorithms with warmth and precision.",
        "appearance_prompt": (
            "portrait of a Victorian woman mathematician, dark hair in a bun, lace collar, "
            "soft window light, oil painting"
        ),
        "negative_prompt": "blurry, deformed hands, text, watermark",
        "base_seed": 1815,
    },
    {
        "name": "Captain Nova",
        "slug": "captain-nova",
        "description": "A starship captain who narrates mission logs.",
        "appearance_prompt": "sci-fi starship captain, silver uniform, confident smile, bridge lights, cinematic, 35mm",
        "negative_prompt": "cartoon, low quality",
        "base_seed": 2047,
    },
    {
        "name": "Mika the Barista",
        "slug": "mika-barista",
        "description": "A friendly barista who recommends coffee and small talk.",
        "appearance_prompt": "smiling barista with an apron in a cozy cafe, latte art, warm morning light, photo",
        "negative_prompt": "dark, gloomy",
        "base_seed": 777,
    },
    {
        "name": "Professor Oak Tree",
        "slug": "professor-oak-tree",
        "description": "An ancient talking oak who teaches botany.",
        "appearance_prompt": "ancient oak tree with a kind face in its bark, misty forest, fantasy illustration",
        "negative_prompt": "",
        "base_seed": 42,
    },
]


class Command(BaseCommand):
    help = (
        "Create the default image model (from SAMPLES_MODEL) and a second one, a few demo personas and, if no "
        "superuser exists, an admin login (printed)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default="admin", help="The superuser to create if none exists.")

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        default = default_model()
        second, made = ImageModel.objects.get_or_create(
            name=SECOND_MODEL["name"],
            defaults={**SECOND_MODEL, "steps": default.steps, "guidance_scale": default.guidance_scale},
        )
        self.stdout.write(
            f"Image models: {default.name} (the default), {second.name} ({'created' if made else 'already there'})."
        )
        created = 0
        for data in DEMO_PERSONAS:
            # A persona made now gets its demo model; one already there keeps whatever it was given since.
            extra = {"image_model": second} if data["slug"] == SECOND_MODEL_PERSONA else {}
            _, was_created = Persona.objects.get_or_create(slug=data["slug"], defaults={**data, **extra})
            created += was_created
        self.stdout.write(f"Demo personas: {created} created, {len(DEMO_PERSONAS) - created} already there.")
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("A superuser exists already: log in with it (or `python manage.py changepassword`).")
            return
        password = os.environ.get("DEMO_ADMIN_PASSWORD", "").strip()
        generated = not password
        if generated:
            password = secrets.token_urlsafe(12)
        elif len(password) < 8:
            raise CommandError("DEMO_ADMIN_PASSWORD must be at least 8 characters long.")
        User.objects.create_superuser(username=username, email="", password=password)
        self.stdout.write(
            f"Admin login: username {username!r}, password {password!r}" + (" (generated)" if generated else "")
        )
