"""The planner: pure rules that turn an ordered target list into dated activities.

``plan(request)`` plans a whole batch and previews it; ``next_free_slot`` finds the slot for a
follow-up call. Neither does I/O nor reads the clock; every refusal is a ``PlanError``.
"""

from syncsvc.planner.errors import PlanError
from syncsvc.planner.plan import next_free_slot, plan

__all__ = ["PlanError", "next_free_slot", "plan"]
