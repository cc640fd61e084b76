"""The ``harness`` fixture: every contract test runs once per backend that exists.

A backend is a module ``tests/contract/backend_<name>.py`` defining an async fixture
``harness_<name>``. Pytest refuses ``pytest_plugins`` in a conftest below the root when the
whole suite runs, so each backend module's fixtures are imported into this conftest
instead: the names in its ``__all__`` (all its fixtures, e.g. a session-scoped fake server),
or just ``harness_<name>`` without one. Adding a backend needs only its module.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from tests.contract.harness import ProviderHarness

BACKENDS = [
    n
    for n in ("caldav", "xandikos", "graph", "google")
    if importlib.util.find_spec(f"tests.contract.backend_{n}")
]

for _backend in BACKENDS:
    _module = importlib.import_module(f"tests.contract.backend_{_backend}")
    for _name in getattr(_module, "__all__", [f"harness_{_backend}"]):
        globals()[_name] = getattr(_module, _name)


@pytest.fixture(params=BACKENDS)
def harness(request: pytest.FixtureRequest) -> ProviderHarness:
    """The backend's harness, on a fresh, empty calendar."""
    backend: ProviderHarness = request.getfixturevalue(f"harness_{request.param}")
    return backend
