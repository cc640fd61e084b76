"""The scheduler: runs every saved schedule at its cron occurrences.

Every ``tick_s`` it claims the due occurrences and the due retries (``service/schedules.py``
says how a claim stays exactly-once across processes), and runs each claimed attempt:

1. ``GET targets_url``, signed, within ``TARGETS_TIMEOUT_S`` and ``max_body_bytes``;
2. check the answer, ``{"targets": [...]}``, with the ``POST /v1/batches`` body model;
3. commit the saved plan with those targets as a batch (``service/batches.commit``).

Any failure (HTTP status, timeout, not JSON, invalid targets, a plan that cannot be planned)
is written on the run, which is retried with backoff; nothing is fatal to the loop.

**The signed request** carries the tenant's Standard Webhooks headers (``webhook-id``,
``webhook-timestamp``, ``webhook-signature``; ``service/signing.py``) over the URL exactly as
the schedule stores it, the GET having no body. Redirects are not followed (the signature must
not travel to another host).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import ValidationError as PydanticValidationError

from syncsvc.api._framework import validation_error
from syncsvc.api.plan_schemas import PlanBody
from syncsvc.config import Settings
from syncsvc.errors import SyncSvcError
from syncsvc.providers._http import ssl_context
from syncsvc.providers.egress import REFUSED_FOR_TENANT, GuardedConnector, is_refusal
from syncsvc.service import schedules as service
from syncsvc.service.plans import Clock, PlanSpec, system_clock
from syncsvc.store.crypto import SecretBox
from syncsvc.store.db import Database, is_unavailable

log = logging.getLogger("syncsvc.scheduler")

TICK_S = 5.0
TARGETS_TIMEOUT_S = 30.0
#: Due schedules and due retries each read per tick; the rest wait for the next tick.
DUE_PER_TICK = 100
#: Runs fetching and committing at once in one scheduler.
RUNS_AT_ONCE = 8
READ_CHUNK_BYTES = 64 * 1024


class TargetsError(SyncSvcError):
    """The CRM's targets endpoint did not answer with usable targets."""

    code = "targets_unavailable"


async def fetch_targets(
    http: aiohttp.ClientSession, signed: Mapping[str, str], url: str, *, max_bytes: int
) -> list[Any]:
    """The ``targets`` list from the CRM, unchecked; every failure is a ``TargetsError``."""
    headers = {**signed, "Accept": "application/json"}
    try:
        async with http.get(url, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                raise TargetsError(f"targets_url answered HTTP {response.status}")
            if response.content_length is not None and response.content_length > max_bytes:
                raise TargetsError(f"targets_url answer is larger than {max_bytes} bytes")
            raw = bytearray()
            async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                raw += chunk
                if len(raw) > max_bytes:
                    raise TargetsError(f"targets_url answer is larger than {max_bytes} bytes")
    except TimeoutError as exc:
        raise TargetsError("targets_url did not answer in time") from exc
    except aiohttp.ClientError as exc:
        if is_refusal(exc):
            log.warning("event=egress.refused what=targets_url detail=%s", exc)
            raise TargetsError(f"targets_url could not be fetched: {REFUSED_FOR_TENANT}") from exc
        raise TargetsError(f"targets_url could not be fetched: {type(exc).__name__}") from exc
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TargetsError(f"targets_url answer is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("targets"), list):
        raise TargetsError('targets_url answer is not {"targets": [...]}')
    targets: list[Any] = data["targets"]
    return targets


def plan_spec(plan: Mapping[str, Any], targets: list[Any], run: service.ClaimedRun) -> PlanSpec:
    """The run's plan checked like a ``POST /v1/batches`` body: the 422 details name fields."""
    try:
        body = PlanBody.model_validate(service.run_body(plan, targets, run.day))
    except PydanticValidationError as exc:
        raise validation_error(exc, ()) from exc
    return body.to_spec()


def describe(exc: SyncSvcError) -> str:
    """An error as one line for ``ScheduleRun.error``: the message, then each detail."""
    details = "; ".join(
        f"{'.'.join(str(part) for part in d.loc)}: {d.msg}" if d.loc else d.msg for d in exc.details
    )
    return f"{exc.message} ({details})" if details else exc.message


@dataclass(slots=True)
class Scheduler:
    db: Database
    box: SecretBox
    http: aiohttp.ClientSession
    clock: Clock
    max_body_bytes: int

    async def tick(self) -> int:
        """Claims what is due now and runs it; answers how many attempts were run."""
        now = self.clock()
        claimed: list[service.ClaimedRun] = []
        async with self.db.session() as session:
            due = await service.due_schedules(session, now, DUE_PER_TICK)
            retries = await service.due_retries(session, now, DUE_PER_TICK)
        for schedule in due:
            run = await service.claim_occurrence(self.db, schedule, now)
            if run is not None:
                claimed.append(run)
        for run_id, attempts in retries:
            run = await service.claim_retry(self.db, run_id, attempts, now)
            if run is not None:
                claimed.append(run)
        gate = asyncio.Semaphore(RUNS_AT_ONCE)

        async def gated(run: service.ClaimedRun) -> None:
            async with gate:
                await self.run(run)

        outcomes = await asyncio.gather(*(gated(run) for run in claimed), return_exceptions=True)
        for run, outcome in zip(claimed, outcomes, strict=True):
            if isinstance(outcome, Exception):
                # Not even the failure could be written (the database went away): the run's
                # lease runs out and it is tried again.
                log.error(
                    "event=schedule.run.unrecorded schedule=%s error=%r", run.schedule_id, outcome
                )
        return len(claimed)

    async def run(self, run: service.ClaimedRun) -> None:
        """One attempt of one occurrence; its outcome is written on the run, never raised."""
        started = time.perf_counter()
        try:
            signed = await service.targets_headers(self.db, self.box, run)
            targets = await fetch_targets(
                self.http, signed, run.targets_url, max_bytes=self.max_body_bytes
            )
            spec = plan_spec(run.plan, targets, run) if targets else None
            result = await service.finish(self.db, run, spec, self.clock())
        except SyncSvcError as exc:
            result = await service.record_failure(self.db, run, describe(exc), self.clock())
        except Exception as exc:
            # A bug, not bad input: keep the traceback, record the run, keep the loop alive.
            log.exception("event=schedule.run.error schedule=%s", run.schedule_id)
            error = f"internal error: {type(exc).__name__}"
            result = await service.record_failure(self.db, run, error, self.clock())
        log.info(
            "event=schedule.run schedule=%s occurrence=%s attempt=%d state=%s batch=%s ms=%.1f",
            run.schedule_id,
            run.occurrence.isoformat(),
            run.attempt,
            "lost" if result is None else result.state,
            None if result is None else result.batch_id,
            (time.perf_counter() - started) * 1000,
        )


async def run_scheduler(
    settings: Settings,
    db: Database,
    stop: asyncio.Event,
    *,
    clock: Clock = system_clock,
    tick_s: float = TICK_S,
    targets_timeout_s: float = TARGETS_TIMEOUT_S,
) -> None:
    """Runs schedules until ``stop`` is set. Safe to run in every process: claims are
    exactly-once across them."""
    timeout = aiohttp.ClientTimeout(total=targets_timeout_s)
    connector = GuardedConnector(settings.egress, ssl=ssl_context())
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        scheduler = Scheduler(
            db,
            SecretBox(settings.secret_key, settings.secret_key_previous),
            http,
            clock,
            settings.max_body_bytes,
        )
        while not stop.is_set():
            try:
                await scheduler.tick()
            except Exception as exc:
                if is_unavailable(exc):
                    # Away for a moment: logged once per outage; the next tick tries again.
                    db.outage.down(exc)
                else:
                    log.exception("event=scheduler.tick.error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick_s)
