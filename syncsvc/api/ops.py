"""Operations: sync cycles, queue depth and dead operations, retry. Operator key only.

The auth middleware lets only ``SYNCSVC_OPERATOR_KEY`` through ``/v1/ops/…`` (a tenant's key
is a 403); operators see every tenant. The dashboard shows the same models.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

from syncsvc.api._framework import Ctx, Routes
from syncsvc.api.pagination import Page, PageQuery, cursor_key, encode_cursor
from syncsvc.api.plan_schemas import instant
from syncsvc.errors import ErrorDetail, ValidationError
from syncsvc.service import ops as service
from syncsvc.store.types import utcnow

routes = Routes(tag="operations")

#: Ids one retry request may name; "all" covers any number.
RETRY_IDS_MAX = 1000
MAILBOX_MAX_CHARS = 2000
#: Operation ids are 64-bit (PostgreSQL BIGINT).
OperationId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class CycleOut(BaseModel):
    id: int
    provider: str
    mailbox: str
    started_at: str
    finished_at: str | None
    duration_ms: int | None
    done: int
    failed: int
    throttled: int


class CyclesQuery(PageQuery):
    mailbox: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAILBOX_MAX_CHARS,
        description="`<provider>:<calendar>`",
    )
    provider: str | None = Field(default=None, min_length=1, max_length=16)


class LaneOut(BaseModel):
    mailbox: str
    provider: str
    lane: str
    pending: int
    running: int
    dead: int
    #: Pending but held back: backing off after an error, or the mailbox is paused.
    waiting: int
    oldest_pending_age_s: float | None


class DeadOut(BaseModel):
    id: int
    kind: str
    provider: str
    mailbox: str
    lane: str
    tenant_id: str
    tenant_name: str
    batch_id: str | None
    activity_id: str | None
    user_id: str | None
    attempts: int
    last_error: str | None
    created_at: str
    failed_at: str


class QueueOut(BaseModel):
    lanes: list[LaneOut]
    dead_total: int
    #: Newest first; ``?limit=&cursor=`` page through it.
    dead: Page[DeadOut]


class RetryIn(BaseModel):
    ids: list[OperationId] | None = Field(
        default=None, min_length=1, max_length=RETRY_IDS_MAX, description="Dead operations' ids."
    )
    all: bool = Field(default=False, description="Every dead operation.")

    @model_validator(mode="after")
    def _one_of(self) -> RetryIn:
        if (self.ids is None) == (not self.all):
            raise ValueError('give either "ids" or "all": true')
        return self


class RetryOut(BaseModel):
    retried: int


def cycle_out(view: service.CycleView) -> CycleOut:
    return CycleOut(
        id=view.id,
        provider=view.provider,
        mailbox=view.mailbox,
        started_at=instant(view.started_at) or "",
        finished_at=instant(view.finished_at),
        duration_ms=view.duration_ms,
        done=view.done,
        failed=view.failed,
        throttled=view.throttled,
    )


def lane_out(depth: service.LaneDepth, now: datetime) -> LaneOut:
    return LaneOut(
        mailbox=depth.mailbox,
        provider=depth.provider,
        lane=depth.lane,
        pending=depth.pending,
        running=depth.running,
        dead=depth.dead,
        waiting=depth.waiting,
        oldest_pending_age_s=depth.oldest_pending_age_s(now),
    )


def dead_out(op: service.DeadOperation) -> DeadOut:
    return DeadOut(
        id=op.id,
        kind=op.kind,
        provider=op.provider,
        mailbox=op.mailbox,
        lane=op.lane,
        tenant_id=op.tenant_id,
        tenant_name=op.tenant_name,
        batch_id=op.batch_id,
        activity_id=op.activity_id,
        user_id=op.user_id,
        attempts=op.attempts,
        last_error=op.last_error,
        created_at=instant(op.created_at) or "",
        failed_at=instant(op.failed_at) or "",
    )


def _bad_cursor() -> ValidationError:
    return ValidationError(
        "the cursor is not valid",
        [ErrorDetail(("query", "cursor"), "not a cursor from this list")],
    )


@routes.endpoint(
    "GET",
    "/v1/ops/cycles",
    query=CyclesQuery,
    response=Page[CycleOut],
    summary="Sync cycles, newest first",
)
async def list_cycles(ctx: Ctx, query: CyclesQuery) -> Page[CycleOut]:
    """One row per worker pass over one mailbox: what it did and how long it took."""
    async with ctx.session() as session:
        views = await service.list_cycles(
            session,
            query.limit,
            cursor_key(query.cursor, datetime, int),
            mailbox=query.mailbox,
            provider=query.provider,
        )
    shown = views[: query.limit]
    more = len(views) > query.limit
    return Page[CycleOut](
        items=[cycle_out(v) for v in shown],
        next_cursor=encode_cursor([shown[-1].started_at.isoformat(), shown[-1].id])
        if more
        else None,
    )


@routes.endpoint(
    "GET",
    "/v1/ops/queue",
    query=PageQuery,
    response=QueueOut,
    summary="Queue depth per mailbox and lane, and the dead operations",
)
async def get_queue(ctx: Ctx, query: PageQuery) -> QueueOut:
    """``limit``/``cursor`` page through the dead operations (newest first)."""
    now = utcnow()
    async with ctx.session() as session:
        lanes = await service.queue_depth(session, now)
        dead = await service.dead_operations(
            session, query.limit, _first(cursor_key(query.cursor, int))
        )
        dead_total = await service.count_dead(session)
    shown = dead[: query.limit]
    return QueueOut(
        lanes=[lane_out(depth, now) for depth in lanes],
        dead_total=dead_total,
        dead=Page[DeadOut](
            items=[dead_out(op) for op in shown],
            next_cursor=encode_cursor([shown[-1].id]) if len(dead) > query.limit else None,
        ),
    )


@routes.endpoint(
    "POST",
    "/v1/ops/retry",
    body=RetryIn,
    response=RetryOut,
    summary="Retry dead operations",
)
async def retry_operations(ctx: Ctx, body: RetryIn) -> RetryOut:
    """Dead operations go back to pending with fresh attempts and their failed ledger rows to
    the state they work towards; ids that are not dead are ignored. Answers how many."""
    return RetryOut(retried=await service.retry(ctx.db, None if body.all else body.ids))


def _first(key: tuple[Any, ...] | None) -> int | None:
    return None if key is None else int(key[0])
