"""The asynchronous engine's bookkeeping of silos awaiting their owner's approval (issue 27)."""

from __future__ import annotations

from fedcore.server.engine.approvals import APPROVAL_POLL_FIRST, APPROVAL_POLL_MOST, ApprovalWaits


def test_a_waiting_worker_is_asked_again_after_a_doubling_delay_up_to_the_most() -> None:
    waits = ApprovalWaits(timeout=3600)
    delays = [waits.awaiting("w1", "owner", now=float(t)) for t in range(8)]
    assert delays[:3] == [APPROVAL_POLL_FIRST, 2 * APPROVAL_POLL_FIRST, 4 * APPROVAL_POLL_FIRST]
    assert delays[-1] == APPROVAL_POLL_MOST
    assert not waits.may_ask("w1", 7.0)
    assert waits.may_ask("w1", 7.0 + APPROVAL_POLL_MOST)
    assert waits.may_ask("other", 7.0)  # positive control: nobody else is held back
    assert waits.names() == ["owner"]
    assert waits.next_ask(7.0) == 7.0 + APPROVAL_POLL_MOST


def test_an_approval_ends_the_wait_and_a_later_denial_leaves_the_worker_out() -> None:
    waits = ApprovalWaits(timeout=3600)
    waits.awaiting("w1", "owner", now=0.0)
    waits.settled("w1")  # it trained: approved
    assert waits.names() == []
    assert waits.deadline() is None
    assert waits.may_ask("w1", 0.0)
    assert waits.refused("w1", "denied by the data owner")
    assert not waits.may_ask("w1", 1e9)
    assert waits.left_out == {"w1": "denied by the data owner"}


def test_a_refusal_from_a_worker_that_never_waited_does_not_leave_it_out() -> None:
    waits = ApprovalWaits(timeout=3600)
    assert not waits.refused("w2", "the budget is spent")
    assert waits.may_ask("w2", 0.0)


def test_no_decision_within_the_timeout_leaves_the_worker_out() -> None:
    waits = ApprovalWaits(timeout=5)
    assert waits.awaiting("w1", "owner", now=0.0) == APPROVAL_POLL_FIRST
    assert waits.awaiting("w1", "owner", now=2.0) == 3.0  # asked once more at the deadline
    assert waits.deadline() == 5.0
    assert waits.awaiting("w1", "owner", now=5.0) is None
    assert "--approval-timeout 5 s" in waits.left_out["w1"]
    assert not waits.may_ask("w1", 100.0)
    assert waits.deadline() is None


def test_the_waits_of_workers_that_left_are_forgotten() -> None:
    waits = ApprovalWaits(timeout=60)
    waits.awaiting("gone", "a", now=0.0)
    waits.awaiting("here", "b", now=0.0)
    waits.keep_only({"here"})
    assert waits.names() == ["b"]
