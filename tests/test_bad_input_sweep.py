"""A property-based sweep of bad input through `train`'s front (issue 24, item 4): config files (TOML and
YAML), dataset files (the reference JSON, Hugging Face rows, task JSONL) and `--resume` with a changed
option. Every case must end in a clear error (exit 2, one `train: ...` message naming the option, file,
row or field) or be accepted as valid; none may end in a traceback or a hang, or write to the run
directory before validation is done.

The front is everything `train.main` does before engines start: parse, validate, read the data, open and
lock the run directory. What comes after (`train._train`: engines, Ray) is replaced by a stub that records
that the configuration was accepted. The number of cases each sweep tries is its `max_examples`
(docs/measurements.md has the counts of a run); `--hypothesis-show-statistics` prints them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from driver import train
from driver.config_sources import build_parser
from driver.train_config import MAX_PROBLEMS, RESUMABLE_OVERRIDES, TrainConfig
from shared.run_layout import write_json_atomic

# Derandomized: CI tries the same cases every run (a sweep that found a new case now and then would make CI
# fail at random); to search further, run with --hypothesis-seed=random.
SWEEP = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
FIELDS = TrainConfig.model_fields
# A message is clear when it names an option, or the file it read.
OPTION = re.compile(r"--[a-z][a-z-]+")
# Files written by the front itself once validation passed: the run lock and its holder record.
LOCK_FILES = {".driver.lock", ".driver.json"}


def run_front(argv: list[str]) -> tuple[int, str, bool]:
    """`train.main(argv)` up to the engines: (exit status, what it printed on stderr, whether the run was
    accepted, i.e. reached the engines). argparse's own refusals (exit 2, usage and the option) count as
    clear errors."""
    accepted = []
    err = io.StringIO()

    def engines(config, problems, resume, argv, on_member_done):
        accepted.append(config)
        return train.EXIT_OK

    with (
        mock.patch.object(train, "_train", engines),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            status = train.main(argv)
        except SystemExit as e:  # argparse: "train: error: argument --x: ..."
            status = e.code
    return status, err.getvalue(), bool(accepted)


def assert_clear(status: int, err: str, accepted: bool, names: list[str], out: Path) -> None:
    """Accepted (exit 0, the stub reached), or refused with exit 2 and one clear message naming an option
    or one of `names` (files), with nothing written to the run directory `out`."""
    if accepted:
        assert status == train.EXIT_OK, err
        return
    assert status == train.EXIT_INVALID, err
    assert "Traceback" not in err, err
    assert err.startswith("train: ") or "train: error: argument" in err, err
    assert OPTION.search(err) or any(name in err for name in names), f"names no option or file: {err}"
    assert not out.exists() or {p.name for p in out.iterdir()} <= LOCK_FILES, "written before validation"


# ---- config files -----------------------------------------------------------------------------------

# Sizes of generated data: small ones, around the conciseness data's 643 questions, and out of range.
# (A valid size in the thousands only makes generation slower: 20 s for the most, MAX_PROBLEMS.)
SIZES = st.one_of(
    st.integers(-5, 300),
    st.integers(600, 700),
    st.integers(MAX_PROBLEMS + 1, 10**40),
    st.integers(max_value=-1),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**310),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["cpu", "cuda", "vllm", "generated", "reference", "hf", "countdown", "conciseness"]),
    st.sampled_from(["tasks.example:NoSuchTask", "no.such.module:Task", "countdown:", "zscore", "rank"]),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(st.integers(), max_size=3),
    st.dictionaries(
        st.text(max_size=5), st.one_of(st.integers(), st.floats(), st.text(max_size=5)), max_size=3
    ),
)


@st.composite
def options(draw) -> dict[str, Any]:
    """A table of options: known names with values of any type (sizes kept where generating data is
    fast: a valid size above a few hundred only makes generation slower), and sometimes unknown names."""
    names = draw(st.lists(st.sampled_from(sorted(set(FIELDS) - {"output_dir", "resume"})), max_size=6))
    table = {}
    for name in names:
        table[name] = draw(SIZES if name in ("train_size", "eval_size") else VALUES)
    if draw(st.booleans()):
        table[draw(st.text(min_size=1, max_size=10))] = draw(SCALARS)
    return table


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_text(table: dict[str, Any]) -> str:
    """TOML for `table` (TOML has no null: None values are left out)."""
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in table.items() if v is not None)


def sweep_config(text: str | bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / f"options{suffix}", Path(tmp) / "run"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        status, err, accepted = run_front(["--config", str(path), "--output-dir", str(out)])
        assert_clear(status, err, accepted, [str(path)], out)


@SWEEP
@given(options())
# Found while writing the sweep (before the fix: OverflowError; TPU=inf and a 10**40-problem dataset, whose
# generation never ends, were accepted).
@example({"stop_deadline": 10**309})
@example({"engine_resources": {"TPU": math.inf}})
@example({"train_size": 10**40})
def test_toml_config_files(table):
    sweep_config(toml_text(table), ".toml")


@SWEEP
@given(options())
def test_yaml_config_files(table):
    sweep_config(yaml.safe_dump(table, allow_unicode=True), ".yaml")


@settings(SWEEP, max_examples=150)
@given(
    st.one_of(st.binary(max_size=200), st.text(max_size=200), st.just(b"")),
    st.sampled_from([".toml", ".yaml", ".yml", ".json"]),
)
@example(b"\x80", ".toml")  # before the fix: UnicodeDecodeError
def test_empty_and_garbage_config_files(data, suffix):
    sweep_config(data, suffix)


# ---- dataset files ----------------------------------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**30),
    st.floats(allow_nan=False),
    st.text(max_size=12),
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
NUMBERS = st.one_of(st.lists(st.integers(0, 100), min_size=1, max_size=4), JSON)
TARGETS = st.one_of(st.integers(-10, 1000), st.integers(min_value=10**30), st.text(max_size=6), JSON)


@st.composite
def reference_rows(draw) -> list[Any]:
    """Rows of the reference format ({"id", "context", "numbers", "target", "solution"}), each field now
    and then missing or of another type; ids sometimes repeat."""
    rows = []
    for index in range(draw(st.integers(0, 12))):
        row = {
            "id": draw(st.one_of(st.integers(0, 5), st.just(index), st.text(max_size=3), JSON)),
            "context": draw(st.one_of(st.just(f"Problem {index}"), JSON)),
            "numbers": draw(NUMBERS),
            "target": draw(TARGETS),
            "solution": draw(st.one_of(st.none(), st.text(max_size=8), JSON)),
        }
        for key in draw(st.lists(st.sampled_from(sorted(row)), max_size=2)):
            row.pop(key, None)
        rows.append(row)
    return draw(st.one_of(st.just(rows), st.just(rows), JSON))


@st.composite
def hf_rows(draw) -> list[Any]:
    """Hugging Face Countdown rows ({"nums", "target"}), fields missing or mistyped now and then."""
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        row = {"nums": draw(NUMBERS), "target": draw(TARGETS)}
        for key in draw(st.lists(st.sampled_from(sorted(row)), max_size=1)):
            row.pop(key, None)
        rows.append(row)
    return rows


@st.composite
def conciseness_rows(draw) -> list[Any]:
    rows = []
    for index in range(draw(st.integers(0, 12))):
        row = {
            "question": draw(st.one_of(st.just(f"Question {index}?"), JSON)),
            "answer": draw(st.one_of(st.just("Yes"), JSON)),
        }
        for key in draw(st.lists(st.sampled_from(sorted(row)), max_size=1)):
            row.pop(key, None)
        rows.append(row)
    return rows


def lines(rows: list[Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


SPLITS = st.tuples(st.integers(0, 14), st.integers(1, 6))  # --eval-size, --prompts-per-member


def sweep_dataset(data: str, suffix: str, options: list[str], split: tuple[int, int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / f"data{suffix}", Path(tmp) / "run"
        path.write_text(data)
        argv = [*options, "--dataset-path", str(path), "--output-dir", str(out)]
        argv += ["--eval-size", str(split[0]), "--prompts-per-member", str(split[1])]
        status, err, accepted = run_front(argv)
        assert_clear(status, err, accepted, [str(path)], out)


@SWEEP
@given(reference_rows(), SPLITS)
def test_reference_json_files(rows, split):
    sweep_dataset(json.dumps(rows), ".json", ["--dataset", "reference"], split)


@SWEEP
@given(hf_rows(), st.sampled_from([".json", ".jsonl"]), SPLITS)
# Found by the sweep in CI's environment (before the fix: OverflowError rendering the prompt).
@example([{"nums": [2**63], "target": 0}], ".json", (0, 1))
def test_hugging_face_row_files(rows, suffix, split):
    data = json.dumps(rows) if suffix == ".json" else lines(rows)
    sweep_dataset(data, suffix, ["--dataset", "hf"], split)


@SWEEP
@given(conciseness_rows(), SPLITS)
def test_conciseness_jsonl_files(rows, split):
    sweep_dataset(lines(rows), ".jsonl", ["--task", "conciseness"], split)


@settings(SWEEP, max_examples=100)
@given(SIZES, st.sampled_from(["countdown", "conciseness"]))
@example(644, "conciseness")  # before the fix: ValueError (the default data has 643 questions)
def test_generated_data_sizes(size, task):
    """The default data of each task at any size: generated, or refused naming the option."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = ["--task", task, "--train-size", str(size), "--eval-size", "4", "--output-dir", str(out)]
        assert_clear(*run_front(argv), [], out)


# ---- resume with a changed option --------------------------------------------------------------------

FIXED = sorted(set(FIELDS) - RESUMABLE_OVERRIDES - {"resume"})


def saved_run(root: Path) -> TrainConfig:
    """A run directory as `train` leaves it before its first checkpoint: config.json."""
    config = TrainConfig(output_dir=str(root), train_size=16, eval_size=4, prompts_per_member=2)
    write_json_atomic(root / "config.json", config.to_dict())
    return config


@settings(SWEEP, max_examples=200)
@given(st.sampled_from(FIXED), st.one_of(st.text(max_size=12), st.integers().map(str), st.floats().map(str)))
def test_resume_with_a_changed_option_is_refused_and_changes_nothing(name, text):
    flag = "--" + name.replace("_", "-")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        out.mkdir()
        saved = saved_run(out)
        kind = type(getattr(saved, name))
        value = [f"--no-{flag[2:]}" if getattr(saved, name) else flag] if kind is bool else [flag, text]
        if kind is dict:
            value = [flag, f"X={text}"]
        try:
            parsed = build_parser().parse_args(value)
        except SystemExit:
            parsed = None
        assume(parsed is None or getattr(parsed, name) != getattr(saved, name))
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        status, err, accepted = run_front(["--resume", "--output-dir", str(out), *value])
        assert not accepted, f"{value} was accepted on resume"
        assert status == train.EXIT_INVALID and "Traceback" not in err, err
        assert OPTION.search(err), err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name not in LOCK_FILES} == before
