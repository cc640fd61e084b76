"""The states and kinds stored in the outbox and the ledger, as types (arq's ``JobStatus`` way).

They are ``StrEnum``s, so a member is the very string stored in the column: rows written by
earlier versions, SQL text and JSON answers need no translation.
"""

from __future__ import annotations

from enum import StrEnum


class OpState(StrEnum):
    """An operation's life: ``running`` is a claim whose lease ends at ``not_before``."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    #: Gave up after its attempts (or at once, for errors no retry mends); retried from ops.
    DEAD = "dead"


#: Operations a worker may still have to run.
OPEN_STATES = (OpState.PENDING, OpState.RUNNING)


class LedgerState(StrEnum):
    """An external event's ledger row: what it holds, or is on its way to."""

    PENDING_CREATE = "pending_create"
    SYNCED = "synced"
    PENDING_UPDATE = "pending_update"
    PENDING_DELETE = "pending_delete"
    DELETED = "deleted"
    FAILED = "failed"


class Lane(StrEnum):
    """Per mailbox, a single user's change (``interactive``) goes before batch work."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


class OpKind(StrEnum):
    """What an operation does: act on a ledger row, or run a task handler
    (``syncsvc/runtime.py``'s ``TASK_HANDLERS``). At most 16 characters (the column)."""

    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    #: A signed callback to the tenant's CRM.
    CALLBACK = "callback"
    GRAPH_SYNC = "graph_sync"
    GRAPH_LIFECYCLE = "graph_lifecycle"
    GRAPH_SUBS = "graph_subs"
    GOOGLE_SYNC = "google_sync"
    GOOGLE_SUBS = "google_subs"
    CALDAV_POLL = "caldav_poll"
    #: Names of earlier versions, still run when found in stored rows.
    LEGACY_GRAPH_SUBS = "graph_subs_check"
    LEGACY_GOOGLE_SUBS = "google_channels"


class BatchState(StrEnum):
    """A batch's state as the API shows it (``Batch.state`` keeps the first, the requested
    deletion, and a failed commit; the rest is derived from the ledger when read)."""

    #: A large batch answered 202 whose rows are being written; none of them is visible yet.
    COMMITTING = "committing"
    #: Operations are still pending.
    SYNCING = "syncing"
    SYNCED = "synced"
    #: Some operations gave up, or the commit itself failed (then with an ``error``).
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


#: ``Batch.state`` values that mean the CRM asked for the batch to go.
DELETION_REQUESTED = (BatchState.DELETING, BatchState.DELETED)
