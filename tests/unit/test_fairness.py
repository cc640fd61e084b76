"""How a worker's mailbox slots are shared between tenants (``syncsvc/queue/fairness.py``)."""

from __future__ import annotations

from syncsvc.queue.fairness import share_slots


def test_free_slots_go_round_robin_whatever_the_queue_lengths() -> None:
    waiting = {"big": [f"m{i}" for i in range(500)], "small": ["x"]}
    shares = share_slots({}, waiting, 4)
    assert shares.start == [("big", "m0"), ("small", "x"), ("big", "m1"), ("big", "m2")]
    assert shares.give_back == {}


def test_a_tenant_with_all_slots_gives_back_what_a_newcomer_is_owed() -> None:
    shares = share_slots({"big": 64}, {"big": ["m64"], "new": ["x"]}, 64)
    assert shares.start == [("new", "x")]  # at once: "big" hands one slot back meanwhile
    assert shares.give_back == {"big": 1}  # the newcomer has one mailbox: one slot is enough


def test_shares_are_max_min_fair() -> None:
    # Three tenants want 10, 40 and 40 of 64 slots: 10, 27 and 27.
    active = {"a": 2, "b": 60, "c": 2}
    waiting = {"a": [f"a{i}" for i in range(8)], "c": [f"c{i}" for i in range(38)]}
    shares = share_slots(active, waiting, 64)
    assert shares.start == [
        *(("a", k) for k in waiting["a"]),
        *(("c", k) for k in waiting["c"][:25]),
    ]
    assert shares.give_back == {"b": 60 - 27}


def test_nothing_is_given_back_without_anyone_waiting() -> None:
    assert share_slots({"big": 64}, {}, 64).give_back == {}
    assert share_slots({"big": 64}, {"big": ["m64"]}, 64).give_back == {}


def test_more_tenants_than_slots_each_keep_one() -> None:
    active = {"a": 2, "b": 1, "c": 1}
    shares = share_slots(active, {"d": ["x"], "e": ["y"]}, 4)
    assert shares.give_back == {"a": 1}  # fair share is 0, rounded up to 1: only "a" is over
    assert shares.start == [("d", "x")]  # "e" waits for the next cycle to end


def test_a_shrunken_limit_still_lets_a_newcomer_in() -> None:
    # The worker lowered its limit to 16 while "big" runs 64: the newcomer still starts now.
    shares = share_slots({"big": 64}, {"big": ["m64"], "new": ["x", "y"]}, 16)
    assert shares.start == [("new", "x"), ("new", "y")]
    assert shares.give_back == {"big": 2}
