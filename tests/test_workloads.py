import pytest

from frugalm.errors import ConfigError
from frugalm.measure.workloads import WORKLOADS, fit_to_context, get_workloads


def test_unknown_workload_suggests():
    with pytest.raises(ConfigError, match="unknown workload 'chatt'; did you mean 'chat'.*Valid choices"):
        get_workloads(["chatt"])


def test_too_long_workload_is_refused_or_scaled_and_recorded():
    long = WORKLOADS["long"]
    with pytest.raises(ConfigError, match="needs 1792 tokens.*context is 512.*--scale-workloads"):
        fit_to_context(long, 512, scale=False)
    scaled = fit_to_context(long, 512, scale=True)
    assert scaled.total_tokens <= 512 and scaled.scaled_from == (1536, 256)
    assert scaled.to_dict()["scaled_from"] == [1536, 256]
    assert fit_to_context(WORKLOADS["chat"], 512, scale=False) is WORKLOADS["chat"]
