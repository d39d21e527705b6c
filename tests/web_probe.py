"""Render every admin page in a fresh process and report whether torch got imported.

Run by tests/test_web_process.py as `python -m tests.web_probe USERNAME PERSONA_ID` against the test
database: a test process has usually imported torch for other tests, so the check needs a
process of its own that does nothing but what the web server does.
"""

from __future__ import annotations

import json
import re
import sys
from collections import deque


def main(username: str, persona_id: int) -> dict[str, object]:
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.test import Client
    from django.urls import reverse

    client = Client(raise_request_exception=False)
    client.force_login(User.objects.get(username=username))
    seen: set[str] = set()
    statuses: dict[str, int] = {}
    todo = deque(["/admin/"])
    while todo and len(seen) < 400:
        url = todo.popleft()
        if url in seen:
            continue
        seen.add(url)
        response = client.get(url)
        statuses[url] = response.status_code
        if response.status_code == 200 and "html" in response.get("Content-Type", ""):
            for link in re.findall(r'href="(/admin/[^"#?]*)"', response.content.decode(errors="replace")):
                if "logout" in link or link.endswith("/delete/") or link in seen:
                    continue
                todo.append(link)
    # The JSON endpoints the pages poll sit in data- attributes, not in links: fetch them too.
    data_url = reverse("admin:gpuscheduler_gpustatuspage_data")
    for url in (reverse("admin:personas_persona_progress", args=[persona_id]), data_url, data_url + "?fragments=1"):
        statuses[url] = client.get(url).status_code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "transformers", "accelerate"})
    return {"pages": len(statuses), "statuses": statuses, "heavy_modules": heavy}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
