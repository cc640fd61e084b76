"""How a worker shares its mailbox slots between tenants: pure, so it is tested on its own.

A slot is one running mailbox cycle. When slots are short, each tenant with work gets an equal
share (max-min fair: a tenant needing less leaves the rest to the others), whatever the number
of mailboxes it has queued. A tenant below its share starts its cycles at once, and a tenant
above its share gives as many back, which its cycles do by claiming no more and ending once
their work in hand is done. So one tenant's 10,000-event drain over 500 mailboxes cannot keep
another tenant's single change waiting for longer than a few calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")


@dataclass(slots=True)
class Shares(Generic[K]):
    """What the dispatcher does now: cycles to start, and per tenant how many to end early."""

    start: list[tuple[str, K]] = field(default_factory=list)
    give_back: dict[str, int] = field(default_factory=dict)


def share_slots(
    active: Mapping[str, int], waiting: Mapping[str, Sequence[K]], slots: int
) -> Shares[K]:
    """``active``: running cycles per tenant; ``waiting``: per tenant, its due mailboxes not
    running, best first; ``slots``: cycles allowed at once."""
    held = {t: n for t, n in active.items() if n > 0}
    queue = {t: list(keys) for t, keys in waiting.items() if keys}
    shares: Shares[K] = Shares()
    free = slots - sum(held.values())
    # Water-filling: each free slot goes to the waiting tenant holding the fewest.
    while free > 0 and queue:
        tenant = min(queue, key=lambda t: (held.get(t, 0), t))
        shares.start.append((tenant, queue[tenant].pop(0)))
        held[tenant] = held.get(tenant, 0) + 1
        free -= 1
        if not queue[tenant]:
            del queue[tenant]
    if not queue:
        return shares
    # Slots are short: a tenant below its fair share starts what it is owed at once, and the
    # tenants above theirs give as many back (so the total comes back down within a few calls).
    fair = _fair_share(held, queue, slots)
    owed = {
        t: min(fair - held.get(t, 0), len(keys))
        for t, keys in queue.items()
        if held.get(t, 0) < fair
    }
    spare = 0
    for tenant in sorted(held, key=lambda t: (-held[t], t)):
        excess = min(held[tenant] - fair, sum(owed.values()) - spare)
        if excess > 0:
            shares.give_back[tenant] = excess
            spare += excess
    for tenant in sorted(owed, key=lambda t: (held.get(t, 0), t)):
        take = min(owed[tenant], spare)
        shares.start.extend((tenant, key) for key in queue[tenant][:take])
        spare -= take
    return shares


def _fair_share(held: Mapping[str, int], queue: Mapping[str, Sequence[object]], slots: int) -> int:
    """The max-min fair share: what each tenant may hold when all of them want more."""
    demand = {t: held.get(t, 0) + len(queue.get(t, ())) for t in {*held, *queue}}
    left, tenants = slots, sorted(demand, key=demand.__getitem__)
    for i, tenant in enumerate(tenants):
        even = left // (len(tenants) - i)
        if demand[tenant] > even:
            return max(even, 1)
        left -= demand[tenant]
    return max(slots, 1)
