"""Shared fixtures. Real servers are started once per session by the modules below."""

import os

#: Every server of the tests listens on loopback, which the egress policy refuses unless it is
#: allowed explicitly (as an operator would for an on-premises server). Processes the tests
#: start get it too. ``calendar.invalid`` is the in-process calendar of ``bench/queue.py``.
LOOPBACK_EGRESS = "127.0.0.1/32 ::1/128 localhost calendar.invalid"
os.environ.setdefault("SYNCSVC_EGRESS_ALLOW", LOOPBACK_EGRESS)

pytest_plugins = [
    "tests.servers.postgres",
    "tests.servers.redis",
    "tests.servers.radicale",
    "tests.servers.xandikos",
    "tests.servers.caldav",
]
