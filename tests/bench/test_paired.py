"""The paired comparison of two systems' latencies on one trace (tokenslice.bench.paired)."""

from __future__ import annotations

import json

import pytest

from tokenslice.bench import paired


def test_sign_test_is_the_two_sided_binomial_tail():
    assert paired.sign_test(5, 10) == 1.0
    assert paired.sign_test(0, 10) == pytest.approx(2 / 1024)
    assert paired.sign_test(10, 10) == pytest.approx(2 / 1024)
    assert paired.sign_test(0, 0) == 1.0


def test_a_uniformly_slower_system_loses_every_pair_and_its_p99_interval_excludes_zero():
    a = [0.1 + 0.01 * i for i in range(100)]
    b = [x + 0.05 for x in a]
    p = paired.compare(a, b)
    assert (p.n, p.b_slower) == (100, 100) and p.sign_p < 1e-20
    assert p.median_diff == pytest.approx(0.05)
    assert p.p99_diff_ci[0] > 0 and p.b_p[2] - p.a_p[2] == pytest.approx(0.05)


def test_noise_around_the_same_latency_is_not_called_a_loss():
    a = [0.3 + 0.01 * (i % 10) for i in range(100)]
    b = [a[(i + 5) % 100] for i in range(100)]  # the same values, shuffled among the requests
    p = paired.compare(a, b)
    assert p.sign_p > 0.05 and p.p99_diff_ci[0] <= 0 <= p.p99_diff_ci[1]


def test_pairs_come_from_results_json_by_request_index_and_skip_unfinished(tmp_path):
    def system(label, ttfts):
        return {"summary": {"label": label}, "requests": [
            {"index": i, "stream": s, "ttft": t} for i, (s, t) in enumerate(ttfts)]}
    results = {"systems": [system("a", [("hi", 0.1), ("b0", 5.0), ("hi", 0.2), ("hi", 0.3)]),
                           system("b", [("hi", 0.2), ("b0", 1.0), ("hi", None), ("hi", 0.4)])]}
    assert paired.pairs_from_results(results, "a", "b", stream="hi") == ([0.1, 0.3], [0.2, 0.4])
    with pytest.raises(KeyError, match="'c' is not in the results"):
        paired.pairs_from_results(results, "a", "c", stream="hi")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert paired.main([str(path), "a", "b"]) == 0
