"""Countdown data sources: reference and HF loaders, the seeded generator, splits, and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from driver.countdown_cli import main as countdown_main
from driver.countdown_data import (
    NUMBER_RANGE,
    TARGET_RANGE,
    CountdownDataError,
    generate,
    load_hf,
    load_reference,
    split,
    write_reference,
)
from shared.countdown import answer_reward, make_prompt, reward

REFERENCE_SPLIT = Path("tests/data/countdown-train-200.json")
HF_ROWS = [{"nums": [44, 19, 35], "target": 98}, {"nums": [41, 36, 8, 4], "target": 17}]


def test_reference_file_round_trips(tmp_path):
    problems = load_reference(REFERENCE_SPLIT)
    assert len(problems) == 200 and problems[0].id == 0 and problems[0].target == "98"
    out = tmp_path / "copy.json"
    write_reference(problems, out)
    assert json.loads(out.read_text()) == json.loads(REFERENCE_SPLIT.read_text())


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_hf_rows_load_from_each_format(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(HF_ROWS))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in HF_ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(HF_ROWS), path)
    problems = load_hf(path)
    assert [(p.id, p.numbers, p.target, p.solution) for p in problems] == [
        (0, (44, 19, 35), "98", None),
        (1, (41, 36, 8, 4), "17", None),
    ]
    reference = load_reference(REFERENCE_SPLIT)[0]  # the same problem as HF row 0
    assert problems[0].prompt == reference.prompt
    assert "[41 36  8  4]" in problems[1].prompt


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [
                {"id": 0, "context": "p", "numbers": [1, 2], "target": "3"},
                {"id": 1, "context": "p", "target": "3"},
            ],
            r"rows\.json: row 1: missing field\(s\) \['numbers'\]",
        ),
        (
            [{"id": 0, "context": "p", "numbers": [1, "x"], "target": "3"}],
            r"row 0: field 'numbers': expected integers",
        ),
        (
            [{"id": 0, "context": "p", "numbers": [1, 2.5], "target": "3"}],
            r"row 0: field 'numbers': expected integers",
        ),
        (
            [{"id": 0, "context": "p", "numbers": [1, 2], "target": "three"}],
            r"row 0: field 'target': expected a number",
        ),
        (
            [{"id": 0, "context": "p", "numbers": [1, 2], "target": "3", "solution": 3}],
            r"row 0: field 'solution': expected a string or null",
        ),
        ({"rows": []}, r"rows\.json: expected a JSON list of rows"),
    ],
)
def test_malformed_reference_rows_name_file_row_and_field(tmp_path, rows, message):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(CountdownDataError, match=message):
        load_reference(path)


def test_malformed_hf_rows_name_file_row_and_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"nums": [1, 2], "target": 3}\n{"nums": [1, 2]}\n')
    with pytest.raises(CountdownDataError, match=r"rows\.jsonl: row 1: missing field\(s\) \['target'\]"):
        load_hf(path)
    path.write_text('{"nums": [1, 2], "target": 3}\nnot json\n')
    with pytest.raises(CountdownDataError, match=r"rows\.jsonl: line 2: not valid JSON"):
        load_hf(path)
    with pytest.raises(CountdownDataError, match=r"unknown file type '\.csv'"):
        load_hf(tmp_path / "rows.csv")


def test_generator_is_deterministic_and_seed_dependent():
    assert generate(50, seed=7) == generate(50, seed=7)
    assert generate(50, seed=7) != generate(50, seed=8)
    assert generate(20, seed=7) == generate(50, seed=7)[:20]


def test_generated_problems_are_solvable_and_in_range():
    problems = generate(300, seed=1)
    assert {len(p.numbers) for p in problems} == {3, 4}
    for p in problems:
        assert all(NUMBER_RANGE[0] <= n <= NUMBER_RANGE[1] for n in p.numbers)
        assert TARGET_RANGE[0] <= int(p.target) <= TARGET_RANGE[1]
        assert p.prompt == make_prompt(p.numbers, p.target)
        assert answer_reward(f"<answer>{p.solution}</answer>", p.numbers, p.target) == 1.0, p
    assert len({p.id for p in problems}) == 300


def test_split_is_deterministic_and_disjoint():
    problems = load_reference(REFERENCE_SPLIT)
    train, held_out = split(problems, 40, seed=3)
    assert len(train) == 160 and len(held_out) == 40
    assert {p.id for p in train}.isdisjoint(p.id for p in held_out)
    assert split(list(reversed(problems)), 40, seed=3)[1] == list(reversed(held_out))  # order-independent
    assert split(problems, 40, seed=4)[1] != held_out
    with pytest.raises(ValueError, match="eval_size"):
        split(problems, 201)


def test_generate_and_score_commands(tmp_path, capsys):
    out = tmp_path / "gen.json"
    assert countdown_main(["generate", "--count", "5", "--seed", "2", "--out", str(out)]) == 0
    problems = load_reference(out)
    assert problems == generate(5, seed=2)
    lines = [
        {
            "problem": {"numbers": list(p.numbers), "target": p.target},
            "response": f"x</think>\n<answer>{p.solution}</answer>",
        }
        for p in problems[:3]
    ] + [{"nums": list(problems[3].numbers), "target": problems[3].target, "response": "no idea"}]
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert countdown_main(["score", "--responses", str(responses)]) == 0
    expected_mean = sum(reward(line["response"], [1], "0").format * 0.1 for line in lines) / 4 + 3 / 4
    assert f"4 responses: accuracy 0.7500, mean reward {expected_mean:.4f}" in capsys.readouterr().out
    responses.write_text('{"response": "x"}\n')
    assert countdown_main(["score", "--responses", str(responses)]) == 2
    assert "line 1: missing field 'numbers'" in capsys.readouterr().err
