"""Schemathesis against the live app's own ``/openapi.json``, on SQLite and PostgreSQL.

Every documented operation is exercised with schema-valid (positive) and schema-violating
(negative) requests: no 5xx, every status/content type/body as documented, invalid input
refused with a 4xx. The budget is shared by the operations, so endpoints added later are
covered without editing this file. Hypothesis is derandomized: the same requests every run.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.schemas import APIOperation

from syncsvc.app import build_app
from syncsvc.config import Settings
from syncsvc.service.tenants import create_tenant
from syncsvc.store.db import Database
from tests.api.conftest import OPERATOR_KEY, SECRET_KEY

#: Generated requests per database kind, at least; shared by the operations.
TOTAL_REQUESTS_MIN = 1000
#: A negative example per this many positive ones.
POSITIVE_PER_NEGATIVE = 2
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0

#: 422 is the contract's answer for valid JSON with an invalid meaning (an unknown subdivision,
#: an impossible schedule), which a schema cannot express; any other refusal is a failure.
POSITIVE_EXPECTED_STATUSES = ["2xx", "401", "403", "404", "409", "422", "429"]


def config_for(api_key: str) -> SchemathesisConfig:
    """Schemathesis sends the tenant's key itself, so it also knows when it left it out."""
    return SchemathesisConfig.from_dict(
        {
            "auth": {"openapi": {"bearer": {"bearer": api_key}}},
            "checks": {
                "positive_data_acceptance": {"expected-statuses": POSITIVE_EXPECTED_STATUSES}
            },
        }
    )


@dataclass(frozen=True, slots=True)
class LiveServer:
    base_url: str
    api_key: str


class _ServerThread(threading.Thread):
    """The app on its own event loop in a thread, as ``syncsvc api`` would serve it."""

    def __init__(self, database_url: str) -> None:
        super().__init__(daemon=True)
        self.database_url = database_url
        self.ready = threading.Event()
        self.started: LiveServer | BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(START_TIMEOUT_S)

    async def _main(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        db = Database(self.database_url)
        runner: web.AppRunner | None = None
        try:
            await db.migrate()
            _, key = await create_tenant(db, "schemathesis")
            settings = Settings(
                database_url=self.database_url,
                secret_key=SECRET_KEY,
                operator_key=OPERATOR_KEY,
                api_rate=(1_000_000, 60),  # fuzz the endpoints, not the tenant quota
            )
            runner = web.AppRunner(build_app(settings, db), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            self.started = LiveServer(f"http://{host}:{port}", key)
            self.ready.set()
            await self._stopping.wait()
        except BaseException as exc:
            self.started = exc
            self.ready.set()
            raise
        finally:
            if runner is not None:
                await runner.cleanup()
            await db.aclose()


@pytest.fixture
def live_server(database_url: str) -> Iterator[LiveServer]:
    thread = _ServerThread(database_url)
    thread.start()
    assert thread.ready.wait(START_TIMEOUT_S), "the server did not start"
    try:
        if isinstance(thread.started, BaseException):
            raise thread.started
        assert isinstance(thread.started, LiveServer)
        yield thread.started
    finally:
        thread.stop()


Statuses = Counter[tuple[str, str, int]]


def _exercise(
    operation: APIOperation,
    mode: GenerationMode,
    examples: int,
    base_url: str,
    session: requests.Session,
    statuses: Statuses,
) -> None:
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S
        )
        statuses[(operation.label, mode.value, response.status_code)] += 1

    run()


def test_the_api_honours_its_own_openapi_document(live_server: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(
        f"{live_server.base_url}/openapi.json", config=config_for(live_server.api_key)
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    per_operation = math.ceil(TOTAL_REQUESTS_MIN / len(operations))
    statuses: Statuses = Counter()
    with requests.Session() as session:
        session.trust_env = False  # 127.0.0.1 only: no proxies from the environment
        for operation in operations:
            _exercise(
                operation,
                GenerationMode.POSITIVE,
                per_operation,
                live_server.base_url,
                session,
                statuses,
            )
            # Nothing can be made invalid about an operation without input.
            if any(k in operation.definition.raw for k in ("parameters", "requestBody")):
                _exercise(
                    operation,
                    GenerationMode.NEGATIVE,
                    math.ceil(per_operation / POSITIVE_PER_NEGATIVE),
                    live_server.base_url,
                    session,
                    statuses,
                )
    assert statuses.total() >= TOTAL_REQUESTS_MIN
    # The key was sent: schema-valid requests reached the handlers (not all 401).
    positive_2xx = sum(
        n for (_, mode, status), n in statuses.items() if mode == "positive" and 200 <= status < 300
    )
    assert positive_2xx >= len(operations)
