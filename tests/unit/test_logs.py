"""The JSON log form: a record's logfmt fields become JSON fields; secrets never appear."""

from __future__ import annotations

import json
import logging

from syncsvc.logs import REDACTED, JsonFormatter


def render(message: str, *args: object, exc: bool = False) -> dict[str, object]:
    record = logging.LogRecord("syncsvc.worker", logging.WARNING, __file__, 1, message, args, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            record.exc_info = sys.exc_info()
    return dict(json.loads(JsonFormatter().format(record)))


def test_fields_of_both_styles_of_record() -> None:
    out = render(
        "sync.op.failed mailbox=%s op=%d error=%s", "graph:a@b.example", 7, "HTTP 400: bad day"
    )
    assert out["event"] == "sync.op.failed" and out["level"] == "warning"
    assert out["mailbox"] == "graph:a@b.example" and out["op"] == "7"
    assert out["error"] == "HTTP 400: bad day"  # a value may hold spaces
    assert out["logger"] == "syncsvc.worker" and str(out["time"]).endswith("+00:00")
    other = render("event=egress.refused what=caldav tenant=%s", "t1")
    assert (other["event"], other["what"], other["tenant"]) == ("egress.refused", "caldav", "t1")


def test_secrets_are_redacted_and_prose_kept() -> None:
    out = render("connect failed client_secret=%s password=%s user=%s", "s3cr3t", "pw", "bo")
    assert out["client_secret"] == REDACTED and out["password"] == REDACTED
    assert "s3cr3t" not in json.dumps(out) and out["user"] == "bo"
    assert out["message"] == "connect failed"
    assert "ValueError: boom" in str(render("sync.cycle.crashed", exc=True)["exc"])
