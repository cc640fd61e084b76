"""Log output for operators: readable lines, or one JSON object per line for a log pipeline.

Every record of ours is written logfmt-style (``sync.cycle mailbox=graph:a@b done=3`` or
``event=egress.refused host=…``), so the JSON form needs no change at the call sites: the
leading word (or ``event=``) becomes ``event`` and each ``key=value`` a field of its own —
``tenant``, ``batch``, ``mailbox``, ``op`` where a record names them. Values of keys that name
a secret are never written, whatever a call site passes.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

#: ``key=value`` pairs: a value runs to the next `` key=`` (so it may hold spaces).
_PAIR = re.compile(r"(?:^|\s)([A-Za-z_][\w.]*)=(.*?)(?=\s[A-Za-z_][\w.]*=|$)", re.DOTALL)
_SECRET = re.compile(r"secret|password|token|authorization|api_key|^key$", re.IGNORECASE)
REDACTED = "[redacted]"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, event, the record's
    ``key=value`` fields, the rest of its text as ``message``, and ``exc`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        first = _PAIR.search(text)
        head = (text[: first.start()] if first else text).strip()
        for key, value in _PAIR.findall(text):
            out[key] = REDACTED if _SECRET.search(key) else value.strip()
        if "event" not in out and head and " " not in head:
            out["event"] = head
        elif head:
            out["message"] = head
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(log_format: str) -> None:
    """The root logger for ``serve``, ``api`` and ``worker``, at INFO."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # Alembic narrates its internals at INFO; store/migrate.py logs what changed.
    logging.getLogger("alembic").setLevel(logging.WARNING)
