"""Shared fixtures. Real servers are started once per session by the modules below."""

pytest_plugins = [
    "tests.servers.postgres",
    "tests.servers.redis",
    "tests.servers.radicale",
]
