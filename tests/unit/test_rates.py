"""Recent rates: amounts per second over the last window, with an injected clock; what the
router and the engine's stat logger feed into them."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.metrics import (
    PREFIX_CACHE_HIT_RATE,
    PREFIX_CACHE_QUERY_RATE,
    Labels,
    MemorySink,
    MetricSpec,
    PrefixCacheMetrics,
)
from orchestrator.rates import RecentRates


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Gauge:
    """Records what is published, by label set, in order."""

    def __init__(self) -> None:
        self.published: list[tuple[dict[str, str], float]] = []

    def record(self, value: float, tags: dict[str, str]) -> None:
        self.published.append((dict(tags), value))


def test_rate_is_the_amount_per_second_over_the_window() -> None:
    clock, gauge = Clock(), Gauge()
    rates = RecentRates(gauge, window_s=10.0, clock=clock, slots=10)
    for _ in range(10):  # 30 at each whole second from 1000 to 1009
        rates.add(30.0, {"model": "a"})
        clock.now += 1.0
    rates.add(5.0, {"model": "b"})
    clock.now += 0.5  # 1010.5: the window's slots are 1001 to 1010, this one half elapsed
    rates.publish()
    assert [tags for tags, _ in gauge.published] == [{"model": "a"}, {"model": "b"}]
    assert gauge.published[0][1] == pytest.approx(270.0 / 9.5)


def test_steady_rate_reads_true_at_any_moment() -> None:
    clock, gauge = Clock(), Gauge()
    rates = RecentRates(gauge, window_s=10.0, clock=clock, slots=20)
    for _ in range(400):  # 8 per second, in steps of 0.25 s
        rates.add(2.0, {"model": "a"})
        clock.now += 0.25
    for offset in (0.0, 0.1, 0.3):
        clock.now += offset
        rates.publish()
        assert gauge.published[-1] == ({"model": "a"}, pytest.approx(8.0, rel=0.06))


def test_rate_falls_to_zero_is_published_once_then_forgotten() -> None:
    clock, gauge = Clock(), Gauge()
    rates = RecentRates(gauge, window_s=10.0, clock=clock)
    rates.add(100.0, {"model": "a"})
    rates.add(0.0, {"model": "b"})  # nothing: no series
    rates.add(-3.0, {"model": "b"})
    clock.now += 1.0
    rates.publish()
    assert len(gauge.published) == 1 and gauge.published[0][1] > 0
    clock.now += 10.0
    rates.publish()
    assert gauge.published[-1] == ({"model": "a"}, 0.0)
    rates.publish()
    assert len(gauge.published) == 2  # forgotten until it counts again
    rates.add(20.0, {"model": "a"})
    rates.publish()
    assert len(gauge.published) == 3 and gauge.published[-1][1] > 0


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RecentRates(Gauge(), window_s=0.0)


def test_prefix_cache_lookups_feed_both_rates() -> None:
    sink = MemorySink()
    metrics = PrefixCacheMetrics(sink, "tiny-a")
    metrics.observe(queries=64, hits=48)
    metrics.observe(queries=16, hits=0)
    assert sink.get(PREFIX_CACHE_QUERY_RATE.name, model="tiny-a") == 80
    assert sink.get(PREFIX_CACHE_HIT_RATE.name, model="tiny-a") == 48


class _Unsortable(Labels):
    """A label set whose pairs cannot be read again once made: recording it must use its key."""

    def items(self) -> Any:
        raise AssertionError("the series key was built again")


def test_a_label_set_made_once_counts_under_its_key_without_building_it_again() -> None:
    clock, gauge, plain_gauge = Clock(), Gauge(), Gauge()
    rates, plain = RecentRates(gauge, window_s=10.0, clock=clock), RecentRates(plain_gauge, window_s=10.0, clock=clock)
    rates.add(30.0, _Unsortable(model="a", route="/v1/completions"))
    rates.add(10.0, {"route": "/v1/completions", "model": "a"})  # the same series
    plain.add(40.0, {"model": "a", "route": "/v1/completions"})
    rates.publish()
    plain.publish()
    assert gauge.published == plain_gauge.published  # one series, at the same rate
    assert [labels for labels, _ in gauge.published] == [{"model": "a", "route": "/v1/completions"}]


def test_the_prefix_cache_label_set_is_made_once_per_model() -> None:
    received: list[Mapping[str, str]] = []

    class Recorder:
        def record(self, value: float, tags: Mapping[str, str]) -> None:
            received.append(tags)

    class Sink:
        def instrument(self, spec: MetricSpec) -> Recorder:
            return Recorder()

    metrics = PrefixCacheMetrics(Sink(), "tiny-a")
    for step in range(3):
        metrics.observe(queries=16, hits=step)
    assert len(received) == 6 and all(tags is received[0] for tags in received)
    assert isinstance(received[0], Labels) and received[0].key == (("model", "tiny-a"),)


@pytest.mark.engine  # imports vLLM
def test_engine_stat_logger_hands_vllms_prefix_cache_stats_on() -> None:
    """The engine's own stat logger passes each step's prefix-cache figures (what vLLM's
    vllm:prefix_cache_* counters add up) to the recent rates."""
    from vllm.v1.metrics.stats import PrefixCacheStats, SchedulerStats

    from orchestrator.engine.vllm_engine import _SchedulerView

    sink = MemorySink()
    view = _SchedulerView(None, prefix_cache=PrefixCacheMetrics(sink, "tiny-a"))
    step = SchedulerStats(num_running_reqs=2, kv_cache_usage=0.5, prefix_cache_stats=PrefixCacheStats())
    step.prefix_cache_stats.record(num_tokens=32, num_hits=16, preempted=False)
    view.record(step, None)
    view.record(SimpleNamespace(num_running_reqs=1, kv_cache_usage=0.25, prefix_cache_stats=None), None)
    assert (view.running, view.kv_cache_usage) == (1, 0.25)
    assert sink.get(PREFIX_CACHE_QUERY_RATE.name, model="tiny-a") == 32
    assert sink.get(PREFIX_CACHE_HIT_RATE.name, model="tiny-a") == 16
