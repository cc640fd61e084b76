"""The planner's one error: input whose meaning makes no plan (HTTP 422 at the edge)."""

from __future__ import annotations

from collections.abc import Sequence

from syncsvc.errors import ErrorDetail, ValidationError

#: How many details the one-line message repeats; the rest are only in ``details``.
SUMMARY_DETAILS_MAX = 10


class PlanError(ValidationError):
    """A request the planner cannot plan; ``details`` say where (``loc``) and why (``msg``).

    It is the only exception ``plan()`` lets out, so the API can answer 422 for every bad
    request without guessing which low-level error meant what.
    """

    code = "validation_error"

    @classmethod
    def at(cls, loc: tuple[str | int, ...], msg: str) -> PlanError:
        """One error with one detail; the message repeats it so logs read on their own."""
        return cls(msg, [ErrorDetail(loc, msg)])

    @classmethod
    def collected(cls, details: Sequence[ErrorDetail]) -> PlanError:
        """Several problems found in one pass, reported together so the CRM fixes them at once."""
        shown = "; ".join(detail.msg for detail in details[:SUMMARY_DETAILS_MAX])
        more = len(details) - SUMMARY_DETAILS_MAX
        return cls(shown + (f"; and {more} more" if more > 0 else ""), details)
