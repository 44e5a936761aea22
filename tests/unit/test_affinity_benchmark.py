"""benchmarks/affinity.py without engines: its arguments, its prompts and its summary."""

from __future__ import annotations

import json

from benchmarks.affinity import (
    Side,
    Turn,
    conversation_messages,
    conversations,
    max_inflight_share,
    parse_args,
    side_figures,
    summary,
    system_prompts,
)
from orchestrator.ingress import PREFIX_BYTES


def turn(ttft: float, cached: int, replica: str = "r1", number: int = 1, began: float = 0, ended: float = 0) -> Turn:
    return Turn(ttft, 100, cached, 4, replica, began, ended, number)


def test_defaults_and_overrides() -> None:
    args = parse_args([])
    assert (args.model, args.groups, args.per_group, args.turns, args.cache_fraction) == ("smollm2", 48, 3, 3, 0.75)
    assert parse_args(["--model", "tiny", "--groups", "3"]).groups == 3


def test_a_conversation_keeps_its_beginning_and_groups_differ_from_their_first_words() -> None:
    prompts = system_prompts(4, 50)
    assert len(set(prompts)) == 4 and len({p.split()[1] for p in prompts}) == 4
    first, later = conversation_messages(prompts[0], 0, []), conversation_messages(prompts[0], 3, ["a", "b", "c"])
    assert later[:2] == first[:2] and len(later) == 8 and later[-1]["content"].endswith("question 3: what comes next?")
    assert conversation_messages(prompts[0], 0, [], 1)[1] != first[1]  # each conversation asks its own


def test_conversations_share_system_prompts_and_a_groups_come_together() -> None:
    args = parse_args(["--groups", "3", "--per-group", "2"])
    prompts = system_prompts(3, args.prefix_words)
    assert min(len(p.encode()) for p in prompts) > PREFIX_BYTES  # the key is the system prompt
    assert conversations(args) == [
        (prompts[0], 0),
        (prompts[0], 1),
        (prompts[1], 2),
        (prompts[1], 3),
        (prompts[2], 4),
        (prompts[2], 5),
    ]


def test_the_summary_compares_the_sides() -> None:
    affinity = Side(shared=[turn(9.0, 0, number=0), turn(0.1, 80), turn(0.2, 80)], no_prefix_wall_s=2.0)
    affinity.no_prefix = [turn(0.1, 0)] * 10  # 40 tokens in 2 s
    default = Side(shared=[turn(0.4, 0), turn(0.4, 20)], no_prefix=[turn(0.1, 0)] * 10, no_prefix_wall_s=2.5)
    line = summary(side_figures(affinity), side_figures(default))
    assert line["shared_prefix"] == {
        "ttft_p50_ratio": 2.0,  # the first turn is left out: 400 ms over 200 ms
        "cached_fraction_default": 0.1,
        "cached_fraction_affinity": 0.8,
    }
    assert line["no_prefix"]["throughput_ratio"] == 1.25
    json.dumps(line)  # the last line is JSON


def test_the_inflight_share_counts_what_overlaps_each_answers_start() -> None:
    turns = [turn(0, 0, "a", began=0, ended=10), turn(0, 0, "a", began=1, ended=10), turn(0, 0, "b", began=2, ended=3)]
    assert max_inflight_share(turns) == 1.0  # at t=1 both in flight are on a
    alone = [turn(0, 0, "a", began=0, ended=1), turn(0, 0, "a", began=2, ended=3)]
    assert max_inflight_share(alone) == 0.0  # never two in flight
    assert max_inflight_share([turn(0, 0, "a", began=0, ended=5), turn(0, 0, "b", began=1, ended=5)]) == 0.5
