"""Handlers of ledger-less operations, by ``Operation.kind``.

Each kind's handler lives with the feature it belongs to; this table is the one place the
worker learns about them. A handler receives the operation (its ``payload``, ``tenant_id``,
``mailbox``) and raises ``syncsvc.errors`` to ask for a retry or to give up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from syncsvc.queue.worker import TaskHandler

TASK_HANDLERS: Mapping[str, TaskHandler] = {}
