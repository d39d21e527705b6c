"""LOG_FORMAT=json: one JSON object per line, for log shippers (journald, Loki, Elasticsearch)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    """time (ISO 8601, UTC), level, logger and message; `exception` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            # Cached on the record as the plain formatter does, so several handlers format it once.
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # A newline inside a message or traceback stays escaped: one record is always one line.
        return json.dumps(entry, ensure_ascii=False, default=str)
