"""The scheduler: runs every saved schedule at its cron occurrences.

Every ``tick_s``, and whenever a run ends, it claims due occurrences and due retries
(``service/schedules.py`` says how a claim stays exactly-once across processes) and starts
each claimed attempt as its own task, within a cap for the process and a smaller one per tenant
(:class:`Scheduler`), so one tenant's slow ``targets_url`` delays only that tenant's runs:

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
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import ValidationError as PydanticValidationError

from syncsvc.api.bodies import validation_error
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
    """Claims due runs and starts each as its own task, under two caps: ``concurrency`` runs
    at once, ``tenant_concurrency`` of them per tenant. What a cap holds back stays due in the
    database, unclaimed, and is claimed by a later tick (woken as soon as a run ends), so a
    tenant whose runs are slow waits only behind its own; caps are per process, claims are
    exactly-once across processes."""

    db: Database
    box: SecretBox
    http: aiohttp.ClientSession
    clock: Clock
    max_body_bytes: int
    concurrency: int
    tenant_concurrency: int
    _running: dict[asyncio.Task[None], service.ClaimedRun] = field(default_factory=dict, init=False)
    _ended: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def tick(self) -> int:
        """Claims what is due now, as far as the caps allow, and starts it; answers how many
        runs were started. Never waits for a run."""
        self._ended.clear()
        now = self.clock()
        busy = Counter(run.tenant_id for run in self._running.values())
        held = {run.run_id for run in self._running.values()}
        if len(self._running) >= self.concurrency:
            return 0
        async with self.db.session() as session:
            retries = await service.due_retries(session, now, DUE_PER_TICK, self.tenant_concurrency)
            due = await service.due_schedules(session, now, DUE_PER_TICK, self.tenant_concurrency)
        started = 0
        candidates: list[service.DueRetry | service.DueSchedule] = [*retries, *due]
        for candidate in candidates:
            if len(self._running) >= self.concurrency:
                break
            if busy[candidate.tenant_id] >= self.tenant_concurrency:
                continue
            if isinstance(candidate, service.DueRetry):
                if candidate.run_id in held:  # still running here, past its lease
                    continue
                run = await service.claim_retry(self.db, candidate.run_id, candidate.attempts, now)
            else:
                run = await service.claim_occurrence(self.db, candidate, now)
            if run is not None:
                busy[run.tenant_id] += 1
                started += 1
                task = asyncio.create_task(self.run(run), name=f"schedule-run-{run.run_id}")
                self._running[task] = run
                task.add_done_callback(self._forget)
        return started

    def _forget(self, task: asyncio.Task[None]) -> None:
        run = self._running.pop(task)
        self._ended.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Not even the failure could be written (the database went away): the run's
            # lease runs out and it is tried again.
            log.error("event=schedule.run.unrecorded schedule=%s error=%r", run.schedule_id, exc)

    async def pause(self, stop: asyncio.Event, timeout_s: float) -> None:
        """Until ``stop``, a run ends (its slot may take what waits) or ``timeout_s``."""
        waits = [asyncio.ensure_future(event.wait()) for event in (stop, self._ended)]
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def drain(self) -> None:
        """Until every run started so far has ended."""
        while self._running:
            await asyncio.wait(list(self._running))

    async def aclose(self) -> None:
        """Stops the runs in flight; each hands its attempt back (``run``)."""
        for task in self._running:
            task.cancel()
        await self.drain()

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
        except asyncio.CancelledError:
            # Stopping: due again now for any scheduler, not after the lease (a transaction
            # cut short rolled back; one that committed makes this write nothing).
            handed = await service.hand_back(self.db, run, self.clock())
            log.info(
                "event=schedule.run.handed_back schedule=%s occurrence=%s handed=%s",
                run.schedule_id,
                run.occurrence.isoformat(),
                handed,
            )
            raise
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
            settings.scheduler_concurrency,
            settings.scheduler_tenant_concurrency,
        )
        try:
            while not stop.is_set():
                try:
                    await scheduler.tick()
                except Exception as exc:
                    if is_unavailable(exc):
                        # Away for a moment: logged once per outage; the next tick tries again.
                        db.outage.down(exc)
                    else:
                        log.exception("event=scheduler.tick.error")
                await scheduler.pause(stop, tick_s)
        finally:
            await scheduler.aclose()
