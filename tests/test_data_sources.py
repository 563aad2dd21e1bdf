"""Sources: loading, field mapping, validation errors and skip counts, resumable iterator."""
from __future__ import annotations

import json
import logging

import pytest

from megatron_opsd.data.sources import (
    MISSING,
    DataConfig,
    DataError,
    FieldMap,
    ProblemIterator,
    extract_problems,
    get_path,
    load_problems,
)

GOOD = {"problem": "1 + 1?", "solution": "1 + 1 = 2. \\boxed{2}", "answer": "2"}


def cfg(**kw) -> DataConfig:
    return DataConfig(path="mem.jsonl", **kw)


def rows_with(bad_row: dict, n: int = 4, at: int = 2) -> list[dict]:
    rows = [dict(GOOD, problem=f"{i} + 1?") for i in range(n)]
    rows[at] = bad_row
    return rows


def test_nested_paths():
    row = {"reward_model": {"ground_truth": "7"}, "messages": [{"content": "q"}, {"content": "a"}]}
    assert get_path(row, "reward_model.ground_truth") == "7"
    assert get_path(row, "messages.1.content") == "a"
    assert get_path(row, "messages.-1.content") == "a"
    for missing in ("reward_model.nope", "messages.5.content", "messages.x", "nope", "reward_model.ground_truth.x"):
        assert get_path(row, missing) is MISSING


def test_field_mapping_with_nested_paths():
    rows = [{"question": "q?", "extra": {"cot": "because \\boxed{3}"}, "reward_model": {"ground_truth": 3}}]
    fields = FieldMap(problem="question", solution="extra.cot", answer="reward_model.ground_truth")
    (p,) = extract_problems(rows, cfg(fields=fields)).problems
    assert (p.index, p.problem, p.solution, p.answer) == (0, "q?", "because \\boxed{3}", "3")


@pytest.mark.parametrize("bad,field,why", [
    ({"solution": "s", "answer": "1"}, "problem", "missing"),
    ({"problem": "p", "answer": "1"}, "solution", "missing"),
    ({"problem": "p", "solution": None, "answer": "1"}, "solution", "missing"),
    ({"problem": "   ", "solution": "s", "answer": "1"}, "problem", "empty"),
    ({"problem": "p", "solution": "", "answer": "1"}, "solution", "empty"),
    ({"problem": 12, "solution": "s", "answer": "1"}, "problem", "not text (got int)"),
    ({"problem": "p", "solution": {"text": "s"}, "answer": "1"}, "solution", "not text (got dict)"),
    ({"problem": "p", "solution": "s"}, "answer", "missing"),
    ({"problem": "p", "solution": "s", "answer": ["1"]}, "answer", "not text or number (got list)"),
])
def test_each_invalid_field_is_an_error_naming_dataset_row_and_field(bad, field, why):
    with pytest.raises(DataError) as err:
        extract_problems(rows_with(bad), cfg(), label="toy.jsonl [train]")
    assert f"toy.jsonl [train]: row 2: field {field!r}" in str(err.value)
    assert why in str(err.value)


def test_skip_drops_invalid_rows_and_logs_the_count(caplog):
    rows = rows_with({"problem": "p", "solution": ""}, n=6, at=1)
    rows[4] = {"problem": None, "solution": "s", "answer": "3"}
    with caplog.at_level(logging.WARNING):
        got = extract_problems(rows, cfg(on_invalid_row="skip"), label="toy")
    assert [p.index for p in got.problems] == [0, 2, 3, 5]
    assert (got.num_rows, got.num_skipped) == (6, 2)
    assert "toy: skipped 2 of 6 rows" in caplog.text


def test_misnamed_solution_field_is_an_error_even_when_skipping():
    rows = [{"problem": "p", "reference": "s", "answer": "1"}] * 3
    with pytest.raises(DataError, match=r"no row has field 'solution' at path 'solution'; columns are \['answer', 'problem', 'reference'\]"):
        extract_problems(rows, cfg(on_invalid_row="skip"))


def test_all_solutions_missing_never_trains_silently():
    rows = [{"problem": "p", "solution": None, "answer": "1"}] * 3
    with pytest.raises(DataError, match="no usable rows"):
        extract_problems(rows, cfg(on_invalid_row="skip"))
    with pytest.raises(DataError, match="3 invalid field"):
        extract_problems(rows, cfg())


def test_answer_may_be_unmapped():
    (p,) = extract_problems([{"problem": "p", "solution": "s"}], cfg(fields=FieldMap(answer=None))).problems
    assert p.answer is None


def test_solution_may_be_unmapped_for_answer_only_sets():
    problems = extract_problems([{"problem": "p", "answer": 3}], cfg(fields=FieldMap(solution=None)))
    (p,) = problems.problems
    assert (p.solution, p.answer) == (None, "3") and problems.fingerprint


def test_config_needs_a_location():
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig()
    with pytest.raises(ValueError, match="needs data.name"):
        DataConfig(source="hub")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow", "save_to_disk"])
def test_local_formats(tmp_path, fmt):
    import datasets

    rows = [dict(GOOD, problem=f"q{i}", meta={"gt": str(i)}) for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "arrow":
        path = tmp_path / "rows"
        ds.save_to_disk(str(path))
        path = next(path.glob("*.arrow"))
    else:
        ds.save_to_disk(str(path))
    got = load_problems(DataConfig(path=str(path), fields=FieldMap(answer="meta.gt")))
    assert [(p.problem, p.answer) for p in got.problems] == [(f"q{i}", str(i)) for i in range(5)]


def test_unknown_file_type(tmp_path):
    (tmp_path / "rows.csv").write_text("problem,solution\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_problems(DataConfig(path=str(tmp_path / "rows.csv")))


def test_shipped_data_loads():
    train = load_problems(DataConfig(path="data/arith/train.jsonl"))
    assert len(train) >= 2000 and train.num_skipped == 0


def _set(n: int):
    return extract_problems([dict(GOOD, problem=f"q{i}") for i in range(n)], cfg())


def test_iterator_is_deterministic_and_reshuffles_each_epoch():
    a, b = ProblemIterator(_set(7), seed=3), ProblemIterator(_set(7), seed=3)
    first = [p.index for p in a.take(21)]
    assert first == [p.index for p in b.take(21)]
    epochs = [first[0:7], first[7:14], first[14:21]]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    assert [p.index for p in ProblemIterator(_set(7), seed=4).take(7)] != epochs[0]
    assert [p.index for p in ProblemIterator(_set(7), seed=3, shuffle=False).take(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]


@pytest.mark.parametrize("stop", [0, 5, 7, 16])
def test_iterator_state_round_trip(stop):
    data = _set(7)
    whole = [p.index for p in ProblemIterator(data, seed=11).take(30)]
    first = ProblemIterator(data, seed=11)
    head = [p.index for p in first.take(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint's serialisation
    resumed = ProblemIterator(data, seed=11)
    resumed.load_state_dict(state)
    assert head + [p.index for p in resumed.take(30 - stop)] == whole


def test_resume_refuses_a_changed_dataset_or_seed():
    state = ProblemIterator(_set(7), seed=11).state_dict()
    with pytest.raises(DataError, match="num_problems was 7"):
        ProblemIterator(_set(8), seed=11).load_state_dict(state)
    with pytest.raises(DataError, match="seed was 11"):
        ProblemIterator(_set(7), seed=12).load_state_dict(state)
    changed = extract_problems([dict(GOOD, problem=f"Q{i}") for i in range(7)], cfg())
    with pytest.raises(DataError, match="fingerprint"):
        ProblemIterator(changed, seed=11).load_state_dict(state)


def test_hub_source_reads_a_named_dataset(tmp_path):
    """The hub branch, offline: ``datasets`` resolves a directory name like a hub repository."""
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    got = load_problems(DataConfig(source="hub", name=str(tmp_path), split="train"))
    assert got.label == f"{tmp_path} [train]" and got.problems[0].solution == GOOD["solution"]
