"""The fair-share metric counted only while every batch tenant is backlogged, against the whole-window one.

Hand-built records where the two definitions disagree, with the numbers worked out by hand.
"""

from __future__ import annotations

import math

import pytest

from tokenslice.bench.stats import RequestResult, backlogged, fairness

W = {"batch-a": 2.0, "batch-b": 1.0}


def _req(i: int, tenant: str, sent: float, times: list[float], *, status: str = "ok") -> RequestResult:
    return RequestResult(index=i, stream=tenant, tenant=tenant, priority_class="batch", scheduled=sent, sent=sent,
                         first_token=times[0] if times else None, end=times[-1] if times else None,
                         token_times=list(times), completion_tokens=len(times), status=status)  # type: ignore[arg-type]


def test_backlogged_means_waiting_for_a_first_token_or_paused_not_merely_unfinished() -> None:
    streaming = _req(0, "batch-a", 1.0, [2.0, 2.1, 2.2, 5.0, 5.1])  # waits 1-2, then a 2.8 s pause
    never = _req(1, "batch-a", 6.0, [], status="timeout")            # sent at 6, never served
    assert backlogged([streaming, never], "batch-a", "batch", 0, 10) == [(1.0, 2.0), (2.2, 5.0), (6.0, 10.0)]
    assert backlogged([streaming, never], "batch-a", "batch", 1.5, 8) == [(1.5, 2.0), (2.2, 5.0), (6.0, 8.0)]
    # a request that streams without a stall is being served: its tenant is not backlogged, though unfinished
    assert backlogged([_req(2, "batch-a", 0.0, [0.1 * k for k in range(1, 100)])], "batch-a", "batch", 0, 10) == [
        (0.0, 0.1)]


def test_a_tenant_asking_less_than_its_share_is_not_counted_unfair() -> None:
    # [0, 10]: both wait (a2 and b2 queued); a gets 20 tokens, b 10 = exactly 2 : 1.
    # [10, 20): a's last request streams 5 tokens and a asks for nothing more; b, still waiting, gets 20.
    a1 = _req(0, "batch-a", 0.0, [0.25 + 0.5 * k for k in range(19)])       # 0.25 .. 9.25: 19 tokens
    a2 = _req(1, "batch-a", 0.0, [10.0, 10.5, 11.0, 11.5, 12.0])            # waits until 10.0
    b1 = _req(2, "batch-b", 0.0, [0.5 + k for k in range(10)] + [10.25 + 0.5 * k for k in range(20)])
    b2 = _req(3, "batch-b", 0.0, [], status="timeout")                      # waits the whole window
    f = fairness([a1, a2, b1, b2], "batch", W, 0, 20)
    # the old number, whole window: a 24, b 30 -> b has 30/54 = 0.556 of the service instead of 1/3: 66.7%
    assert f.output_tokens == {"batch-a": 24, "batch-b": 30}
    assert f.max_share_error == pytest.approx((30 / 54) / (1 / 3) - 1)
    # while both were backlogged ([0, 10]): a 19 + a2's first token at 10.0 = 20, b 10 -> fair
    assert f.backlogged is not None
    assert f.backlogged.seconds == pytest.approx(10.0)
    assert f.backlogged.output_tokens == {"batch-a": 20, "batch-b": 10}
    assert f.backlogged.max_share_error == pytest.approx(0.0)
    assert f.backlogged.jain == pytest.approx(1.0)


def test_unfair_while_both_wait_although_the_whole_window_reads_fair() -> None:
    # [0, 10]: both wait; a gets 10, b 10 (b is over-served: its share is 1/3). [10, 20): only a asks, gets 10.
    a1 = _req(0, "batch-a", 0.0, [0.5 + k for k in range(10)] + [10.5 + k for k in range(10)])
    a2 = _req(1, "batch-a", 0.0, [10.0])          # waits [0, 10]
    b1 = _req(2, "batch-b", 0.0, [0.5 + k for k in range(10)])
    b2 = _req(3, "batch-b", 0.0, [9.9])           # waits [0, 9.9]
    f = fairness([a1, a2, b1, b2], "batch", W, 0, 20)
    assert f.output_tokens == {"batch-a": 21, "batch-b": 11}
    assert f.max_share_error < 0.05                   # whole window: 21 : 11, close to 2 : 1
    b = f.backlogged
    assert b is not None and b.seconds == pytest.approx(9.9)
    assert b.output_tokens == {"batch-a": 10, "batch-b": 11}   # 0.5 .. 9.5 each, plus b2's token at 9.9
    assert b.token_share_error == pytest.approx((11 / 21) / (1 / 3) - 1)
    assert b.max_share_error > 0.5


def test_never_both_backlogged_gives_no_number_not_a_perfect_one() -> None:
    a = _req(0, "batch-a", 0.0, [0.1 * k for k in range(50)])   # served from the moment it was sent
    b = _req(1, "batch-b", 0.0, [], status="timeout")           # b waits all along, a never does
    f = fairness([a, b], "batch", W, 0, 5)
    assert f.max_share_error == pytest.approx(1.0)              # the old number: b got none of its third
    assert f.backlogged is not None and f.backlogged.seconds == 0
    assert math.isnan(f.backlogged.max_share_error) and math.isnan(f.backlogged.jain)


def test_policy_cost_counts_a_prefill_that_ran_while_both_waited() -> None:
    a1 = _req(0, "batch-a", 0.0, [1.0, 1.5])
    a1.prompt_tokens = 40
    a2 = _req(1, "batch-a", 0.0, [5.0])
    b1 = _req(2, "batch-b", 0.0, [2.0])
    b1.prompt_tokens = 10
    b2 = _req(3, "batch-b", 0.0, [6.0])
    f = fairness([a1, a2, b1, b2], "batch", W, 0, 10, input_cost=1, output_cost=2)
    b = f.backlogged
    assert b is not None and b.seconds == pytest.approx(5.0)   # a waits [0, 5], b [0, 6]
    # a: prefill 40 (first token at 1.0) + 2 x (2 tokens + a2's first at 5.0); b: prefill 10 + 2 x 1
    assert b.service == {"batch-a": 40 + 2 * 3, "batch-b": 10 + 2 * 1}
