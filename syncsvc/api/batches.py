"""Batches: commit a plan, read progress, list, edit the template, delete."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from syncsvc.api._framework import DB, Ctx, Routes, json_response
from syncsvc.api.pagination import PageQuery, cursor_key, encode_cursor
from syncsvc.api.plan_schemas import (
    BatchCreatedOut,
    BatchListOut,
    BatchOut,
    BatchPatch,
    BatchPatchedOut,
    PlanBody,
    ProgressOut,
    SyncCountsOut,
    check_sizes,
    instant,
)
from syncsvc.api.plans import body_errors, calendars_of, clock_of, users_out
from syncsvc.service import batches as service
from syncsvc.service import idempotency
from syncsvc.service.batches import BatchView
from syncsvc.store.db import is_unavailable

routes = Routes(tag="batches")


class BatchPath(BaseModel):
    batch_id: str = Field(min_length=1, max_length=64)


def batch_out(view: BatchView) -> BatchOut:
    return BatchOut(**_fields(view))


def _fields(view: BatchView) -> dict[str, object]:
    s = view.sync
    return {
        "id": view.id,
        "state": view.state,
        "total": view.total,
        "created_at": instant(view.created_at),
        "created_by": view.created_by,
        "targetgroup_name": view.targetgroup_name,
        "sync": SyncCountsOut(
            pending=s.pending,
            synced=s.synced,
            failed=s.failed,
            deleting=s.deleting,
            deleted=s.deleted,
        ),
        "progress": ProgressOut(done=view.progress.done, total=view.progress.total)
        if view.progress
        else None,
        "error": view.error,
    }


@routes.endpoint(
    "POST",
    "/v1/batches",
    body=PlanBody,
    response=BatchCreatedOut,
    status=201,
    summary="Commit a plan as a batch",
    heavy=True,
    other_successes=((202, None),),
)
async def create_batch(ctx: Ctx, body: PlanBody) -> BatchCreatedOut | web.Response:
    """Plans like ``POST /v1/plans`` and stores the batch, its activities and their external
    operations in one transaction (201); the calendars follow asynchronously. A batch of more
    than ``SYNCSVC_COMMIT_ASYNC_ACTIVITIES`` activities answers 202 with ``state``
    ``committing`` and ``progress`` instead: its rows are written in one background
    transaction, invisible (no activities, feeds or pushes) until ``GET /v1/batches/{id}``
    shows ``syncing``; if that fails the batch is ``failed`` with an ``error`` and the same
    Idempotency-Key may be retried."""
    key = ctx.request.headers.get("Idempotency-Key")
    check_sizes(body, ctx.settings)
    with body_errors(PlanBody):
        spec = await asyncio.to_thread(body.to_spec)
        async with ctx.session() as session, session.begin():
            created, deferred = await service.commit(
                session,
                ctx.tenant_id,
                spec,
                clock_of(ctx)(),
                calendars_of(ctx),
                defer_over=ctx.settings.commit_async_activities,
                idempotency_key=key,
            )
            out = BatchCreatedOut(
                id=created.id,
                created_by=created.created_by,
                state=created.state,
                total=created.total,
                users=users_out(created.users),
                progress=ProgressOut(done=created.progress.done, total=created.progress.total)
                if created.progress
                else None,
            )
            answer = json_response(out, 202 if deferred else 201)
            if key is not None:  # the replay commits with the batch (see idempotency.py)
                await idempotency.answer_within(
                    session,
                    ctx.tenant_id,
                    key,
                    answer.status,
                    answer.content_type,
                    answer.text,
                )
    if deferred is None:
        _start(ctx.request.app, service.refresh_statistics(ctx.db, created.total))
        return out
    _start(ctx.request.app, service.finish_commit(ctx.db, deferred))
    return answer


#: The deferred commits this application runs (``finish_commit``), awaited at shutdown.
COMMITS = web.AppKey("commits", set[asyncio.Task[None]])
#: At shutdown a deferred commit may finish for this long; then it is cancelled (failed).
SHUTDOWN_WAIT_S = 30.0


def _start(app: web.Application, work: Coroutine[Any, Any, None]) -> None:
    tasks = app[COMMITS]
    task = asyncio.get_running_loop().create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


RECOVERY = web.AppKey("commit_recovery", asyncio.Task[None])


async def recover_commits(app: web.Application) -> None:
    """On start: batches a stopped process left ``committing`` turn ``failed``. The API starts
    even while the database is down: the recovery then waits for it in the background (this
    process's own deferred commits are never among those it fails)."""
    db = app[DB]
    try:
        await service.recover_interrupted(db)
        return
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        db.unavailable(exc)  # logged once

    async def recover() -> None:
        while True:
            await db.wait_until_up()
            try:
                await service.recover_interrupted(db)
                return
            except Exception as exc:
                if not is_unavailable(exc):
                    raise

    app[RECOVERY] = asyncio.get_running_loop().create_task(recover())


async def stop_commits(app: web.Application) -> None:
    """On shutdown: running deferred commits finish, or are cancelled after a while (their
    batches then turn ``failed``, with nothing written)."""
    recovery = app.get(RECOVERY)
    if recovery is not None and not recovery.done():
        recovery.cancel()
    tasks = app[COMMITS].copy()
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_WAIT_S)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)


@routes.endpoint(
    "GET", "/v1/batches", query=PageQuery, response=BatchListOut, summary="List batches"
)
async def list_batches(ctx: Ctx, query: PageQuery) -> BatchListOut:
    """The tenant's batches, newest first."""
    after = cursor_key(query.cursor, datetime, str)
    async with ctx.session() as session:
        views = await service.list_batches(session, ctx.tenant_id, query.limit, after)
    shown = views[: query.limit]
    more = len(views) > query.limit
    return BatchListOut(
        items=[batch_out(v) for v in shown],
        next_cursor=encode_cursor([shown[-1].created_at.isoformat(), shown[-1].id])
        if more
        else None,
    )


@routes.endpoint(
    "GET", "/v1/batches/{batch_id}", path=BatchPath, response=BatchOut, summary="Batch progress"
)
async def get_batch(ctx: Ctx, path: BatchPath) -> BatchOut:
    async with ctx.session() as session:
        return batch_out(await service.get(session, ctx.tenant_id, path.batch_id))


@routes.endpoint(
    "PATCH",
    "/v1/batches/{batch_id}",
    path=BatchPath,
    body=BatchPatch,
    response=BatchPatchedOut,
    summary="Edit a batch's template",
)
async def patch_batch(ctx: Ctx, path: BatchPath, body: BatchPatch) -> BatchPatchedOut:
    """Applies to every activity of the batch and its external event, except those their
    assignee edited in their own calendar, unless ``force``."""
    changes = body.template.model_dump(exclude_unset=True)
    with body_errors(BatchPatch):
        async with ctx.session() as session, session.begin():
            patched = await service.patch(
                session, ctx.tenant_id, path.batch_id, changes, force=body.force
            )
    return BatchPatchedOut(
        **_fields(patched.batch),
        updated=patched.updated,
        skipped_user_edited=patched.skipped_user_edited,
    )


@routes.endpoint(
    "DELETE",
    "/v1/batches/{batch_id}",
    path=BatchPath,
    response=BatchOut,
    status=202,
    summary="Delete a batch and every external event it created",
)
async def delete_batch(ctx: Ctx, path: BatchPath) -> BatchOut:
    """Committed before the answer; ``GET`` shows progress until ``state`` is ``deleted``.
    Deleting twice is fine."""
    async with ctx.session() as session, session.begin():
        view = await service.delete(session, ctx.tenant_id, path.batch_id)
    return batch_out(view)
