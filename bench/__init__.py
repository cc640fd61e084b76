"""Benchmarks: scripts that print figures (``python -m bench.<name>``).

Their servers listen on loopback, which the egress policy refuses unless allowed: the
benchmarks allow it explicitly, as the tests do.
"""

import os

os.environ.setdefault("SYNCSVC_EGRESS_ALLOW", "127.0.0.1/32 ::1/128 localhost calendar.invalid")
