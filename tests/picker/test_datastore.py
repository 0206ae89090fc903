"""Pool addresses and the scraped vLLM load."""

from __future__ import annotations

import pytest

from tokenslice_picker.datastore.endpoints import parse_endpoints
from tokenslice_picker.datastore.scraper import parse_vllm_metrics


def test_parse_endpoints_and_metrics():
    assert parse_endpoints("127.0.0.1:80, localhost:81,127.0.0.1:80") == ["127.0.0.1:80", "127.0.0.1:81"]
    for bad in ("host:80", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:http"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    text = ('# HELP x\nvllm:num_requests_running{model_name="m",engine="0"} 3.0\n'
            'vllm:num_requests_running{model_name="m",engine="1"} 2.0\nvllm:num_requests_waiting 4\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 0.25\nvllm:prefix_cache_hits_total{a="b"} 10\n'
            'vllm:prefix_cache_queries_total 40\nother_metric 1\n')
    assert parse_vllm_metrics(text) == {"running": 5.0, "waiting": 4.0, "kv_usage": 0.25, "prefix_hits": 10.0,
                                        "prefix_queries": 40.0}
