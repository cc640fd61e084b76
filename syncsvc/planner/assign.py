"""Who gets which target: owners, an even split in blocks, or blocks that finish together.

Blocks are contiguous slices of the ordered list, because the CRM's order carries meaning
(sorted by postcode, a user's block is one area of the map).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping, Sequence
from datetime import date

from syncsvc.errors import ErrorDetail
from syncsvc.planner.calendar import Slot
from syncsvc.planner.errors import PlanError
from syncsvc.planner.model import Assignment, PlanUser, Target


def check_user(user_id: str, users: Mapping[str, PlanUser], loc: tuple[str | int, ...]) -> None:
    if user_id not in users:
        raise PlanError.at(loc, f"unknown user {user_id!r}")


def by_owner(
    targets: Sequence[Target], assignment: Assignment, users: Mapping[str, PlanUser]
) -> list[str]:
    """Each target's responsible (or 2nd responsible) user, or the fallback user.

    Every target without one is named in a single error, so the CRM can fix them all at once.
    """
    second = assignment.mode == "second_owner"
    fallback = assignment.fallback_user
    if fallback is not None:
        check_user(fallback, users, ("assignment", "fallback_user"))
    field = "second_owner_id" if second else "owner_id"
    missing: list[ErrorDetail] = []
    missing_ids: list[str] = []
    unknown: list[ErrorDetail] = []
    out: list[str] = []
    for index, target in enumerate(targets):
        owner = target.second_owner_id if second else target.owner_id
        if not owner:
            if fallback is None:
                missing_ids.append(repr(target.id))
                missing.append(
                    ErrorDetail(("targets", index, field), f"target {target.id!r} has no {field}")
                )
                continue
            owner = fallback
        elif owner not in users:
            unknown.append(ErrorDetail(("targets", index, field), f"unknown user {owner!r}"))
            continue
        out.append(owner)
    if missing:
        raise PlanError(f"targets without {field}: {', '.join(missing_ids)}", [*missing, *unknown])
    if unknown:
        raise PlanError.collected(unknown)
    return out


def check_listed(assignment: Assignment, users: Mapping[str, PlanUser]) -> None:
    """``users`` and ``balanced_finish`` need a non-empty list of distinct, known users."""
    if not assignment.users:
        raise PlanError.at(("assignment", "users"), f"mode {assignment.mode} needs users")
    details: list[ErrorDetail] = []
    seen: set[str] = set()
    for index, user_id in enumerate(assignment.users):
        loc = ("assignment", "users", index)
        if user_id not in users:
            details.append(ErrorDetail(loc, f"unknown user {user_id!r}"))
        elif user_id in seen:
            details.append(ErrorDetail(loc, f"user {user_id!r} is listed twice"))
        seen.add(user_id)
    if details:
        raise PlanError.collected(details)


def even_blocks(count: int, n_users: int) -> list[int]:
    """Block sizes as equal as possible, the earlier users taking the extra (49/2 → 25, 24)."""
    base, extra = divmod(count, n_users)
    return [base + 1 if i < extra else base for i in range(n_users)]


def balanced_blocks(
    count: int, streams: Sequence[Iterator[tuple[date, list[Slot]]]]
) -> list[list[Slot]]:
    """Each user's slots for a block size that makes the last dates fall as close as possible.

    Walk the calendar day by day over all users at once until the free slots reach ``count``;
    that day D is the earliest on which everyone together can be done. Every user keeps all
    their slots before D, and the slots still needed are dealt out on D one at a time in user
    order, so as many users as possible finish on D itself. A user with days off simply has
    fewer slots before D and so gets a smaller block.
    """
    taken: list[list[Slot]] = [[] for _ in streams]
    heap: list[tuple[date, int, list[Slot]]] = []
    for index, stream in enumerate(streams):
        first = next(stream, None)
        if first is not None:
            heap.append((first[0], index, first[1]))
    heapq.heapify(heap)
    total = 0
    while heap and total < count:
        day = heap[0][0]
        today: list[tuple[int, list[Slot]]] = []
        while heap and heap[0][0] == day:
            _, index, slots = heapq.heappop(heap)
            today.append((index, slots))
        available = sum(len(slots) for _, slots in today)
        if total + available >= count:
            _deal(today, count - total, taken)
            return taken
        total += available
        for index, slots in today:
            taken[index].extend(slots)
            following = next(streams[index], None)
            if following is not None:
                heapq.heappush(heap, (following[0], index, following[1]))
    raise PlanError.at(
        ("schedule",),
        f"the users have only {total} free slots for {count} activities within the horizon",
    )


def _deal(today: list[tuple[int, list[Slot]]], needed: int, taken: list[list[Slot]]) -> None:
    """Hand out the last day's slots round-robin in user order."""
    today.sort()
    used = [0] * len(today)
    while needed:
        for i, (index, slots) in enumerate(today):
            if needed and used[i] < len(slots):
                taken[index].append(slots[used[i]])
                used[i] += 1
                needed -= 1
