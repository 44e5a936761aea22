"""The soak's process labels stay the same from one memory sample to the next, so every
process's growth is reported (an actor's title changes with the method it runs)."""

from __future__ import annotations

from benchmarks.soak import _label, growth


def test_an_actor_keeps_its_label_whatever_method_it_runs() -> None:
    idle = _label("ServeController", ["ray::ServeController", ""])
    busy = _label("ServeController", ["ray::ServeController.listen_for_change", ""])
    assert idle == busy == "ray::ServeController"
    replica = "ray::ServeReplica:orchestrator-model-qwen2.5:model-qwen2.5"
    assert _label("x", [replica]) == replica  # dots in a deployment's name are kept
    assert _label("python3.11", ["python3.11", "-u", "/ray/dashboard/dashboard.py"]) == "python dashboard.py"
    rows = growth({f"{idle} [7]": 100 << 20}, {f"{busy} [7]": 105 << 20})
    assert rows == [{"process": f"{idle} [7]", "warm_mib": 100, "end_mib": 105, "growth_pct": 5.0}]
