"""ParallelBench tasks (demask/parallelbench.py, data/pb/): scoring parity with upstream, the data's
determinism, counts, shape and train/test disjointness.

Expected scores follow furiosa-ai/ParallelBench @ 72de8f73246ae5b7c742c7eeae9a9853a90084ac:
dataset/parallel_bench/__init__.py:ParallelBench.compute_metrics (score = metric(pred, ref),
score_strict = metric(pred, ref, strict=True)) and dataset/parallel_bench/metrics.py: _parse_list
(the text after the last '[' up to the next ']'; loose: comma split, strip spaces and double
quotes; strict: ', '-separated double-quoted items), list_match_score, list_shuffle_score,
random_insert_score, random_remove_score, random_replace_score, latin_square_score (no strict
variant), parse_sudoku / sudoku_score (equality with the stored solution).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from demask import parallelbench as pb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data", "pb")
FIXTURE = os.path.join(REPO, "tests", "fixtures", "pb_upstream_scores.jsonl")
UPSTREAM_COMMIT = "72de8f73246ae5b7c742c7eeae9a9853a90084ac"
_SPEC = importlib.util.spec_from_file_location("make_pb_data", os.path.join(REPO, "scripts", "make_pb_data.py"))
MAKE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(MAKE)
TRAIN_SIZE = MAKE.TRAIN_SIZE

A, B, C, W = "Ann Lee", "Bob Kim", "Cat Fox", "Wes Day"
ABC = '["Ann Lee", "Bob Kim", "Cat Fox"]'


def load(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def q(*items):
    return pb.quoted_list(items)


def check(row, text, correct, strict):
    got = pb.score(row, text)
    assert (got["correct"], got["strict"]) == (correct, strict), (row["task"], text, got)
    json.dumps(got["extracted"])


# --------------------------------------------------------------------------- hand-written cases

LIST_MATCH_CASES = [
    (ABC, True, True),
    ("The final list:\n" + ABC, True, True),                      # text before the last '[' is cut
    (ABC + "\nThat is everyone.", True, True),                    # text after the first ']' is cut
    (ABC + " [done]", False, False),                              # the last '[' starts the list
    (q(B, A, C), False, False),                                   # wrong order
    (q(A, B, C, C), False, False),                                # duplicate
    (q(A, B), False, False),                                      # missing element
    ('["Ann Lee", "Bob Kim", "Cat Fox]', True, False),            # missing quote: loose strips quotes
    ('"Ann Lee", "Bob Kim", "Cat Fox"', True, False),             # no brackets: strict needs both
    ('["Ann Lee","Bob Kim","Cat Fox"]', True, False),             # strict separator is ', '
    ("[Ann Lee, Bob Kim, Cat Fox]", True, False),                 # unquoted items
    ("['Ann Lee', 'Bob Kim', 'Cat Fox']", False, False),          # single quotes are not stripped
    ('["ann lee", "bob kim", "cat fox"]', False, False),          # case matters
    ("```\n" + ABC + "\n```", True, True),
    ('[\n"Ann Lee",\n"Bob Kim",\n"Cat Fox"\n]', False, False),    # loose keeps the newlines in items
    ('["Ann Lee", "Bob Kim", "Cat Fox", ]', True, False),         # blank items dropped only when loose
    ("", False, False),
]


@pytest.mark.parametrize("text,correct,strict", LIST_MATCH_CASES)
def test_copy_scoring(text, correct, strict):
    check({"task": "copy", "answer": ABC}, text, correct, strict)


def test_sort_is_scored_on_whole_names():
    """The prompt says 'by last name'; upstream's answer is sorted() of the full names."""
    row = {"task": "sort", "answer": q(A, B, C), "list": [C, A, B]}
    check(row, q(A, B, C), True, True)
    check(row, q(C, B, A), False, False)  # Fox, Kim, Lee: by last name, scored wrong


def test_index_tasks_need_the_exact_list():
    check({"task": "insert_index", "answer": q(A, W, B, C)}, q(A, W, B, C), True, True)
    check({"task": "insert_index", "answer": q(A, W, B, C)}, q(W, A, B, C), False, False)
    check({"task": "remove_index", "answer": q(A, C)}, q(A, C), True, True)
    check({"task": "remove_index", "answer": q(A, C)}, q(A, B), False, False)
    check({"task": "replace_index", "answer": q(A, W, C)}, q(A, W, C), True, True)
    check({"task": "replace_index", "answer": q(A, W, C)}, q(W, B, C), False, False)


SHUFFLE = {"task": "shuffle", "answer": {"input": [A, B, C], "example": q(B, C, A)}}


@pytest.mark.parametrize("text,correct,strict", [
    (q(B, C, A), True, True), (q(C, B, A), True, True), (q(A, C, B), True, True),
    (q(A, B, C), False, False),                                   # must differ from the input
    (q(B, B, A), False, False), (q(B, A), False, False), (q(B, A, C, W), False, False),
    ("[Bob Kim, Ann Lee, Cat Fox]", True, False),
])
def test_shuffle_scoring(text, correct, strict):
    check(SHUFFLE, text, correct, strict)


INSERT = {"task": "insert_random", "answer": {"input": [A, B, C], "word": W, "example": q(A, W, B, C)}}
REMOVE = {"task": "remove_random", "answer": {"input": [A, B, C], "example": q(A, C)}}
REPLACE = {"task": "replace_random", "answer": {"input": [A, B, C], "word": W, "example": q(A, W, C)}}


@pytest.mark.parametrize("row,text,correct,strict", [
    (INSERT, q(W, A, B, C), True, True), (INSERT, q(A, W, B, C), True, True),
    (INSERT, q(A, B, W, C), True, True), (INSERT, q(A, B, C, W), True, True),
    (INSERT, q(A, B, C), False, False),                           # word missing
    (INSERT, q(W, A, B, C, W), False, False),                     # word twice
    (INSERT, q(W, B, A, C), False, False),                        # rest reordered
    (INSERT, q(W, B, C), False, False),                           # word replaces instead
    (REMOVE, q(B, C), True, True), (REMOVE, q(A, C), True, True), (REMOVE, q(A, B), True, True),
    (REMOVE, q(C, B), False, False), (REMOVE, q(A), False, False), (REMOVE, q(A, B, C), False, False),
    (REMOVE, q(A, A), False, False),                              # two names gone
    (REMOVE, q(W, C), False, False),
    (REPLACE, q(W, B, C), True, True), (REPLACE, q(A, W, C), True, True), (REPLACE, q(A, B, W), True, True),
    (REPLACE, q(W, W, C), False, False), (REPLACE, q(W, B), False, False), (REPLACE, q(A, B, C), False, False),
    (REPLACE, q(W, C, B), False, False), (REPLACE, q(A, B, C, W), False, False),
    (REPLACE, '["Wes Day", "Bob Kim", "Cat Fox"', True, False),   # no closing bracket
])
def test_random_variants_accept_any_valid_answer(row, text, correct, strict):
    check(row, text, correct, strict)


LATIN = {"task": "latin_square", "answer": {"symbols": ["A", "B", "1", "2"],
                                            "example": "A,B,1,2\nB,A,2,1\n1,2,A,B\n2,1,B,A"}}


@pytest.mark.parametrize("text,ok", [
    ("A,B,1,2\nB,A,2,1\n1,2,A,B\n2,1,B,A", True),
    ("1,2,A,B\n2,1,B,A\nA,B,1,2\nB,A,2,1", True),                  # another valid square
    ("A, B, 1, 2\nB, A, 2, 1\n1, 2, A, B\n2, 1, B, A", True),       # cells are stripped
    ("```csv\nA,B,1,2\nB,A,2,1\n1,2,A,B\n2,1,B,A\n```", True),     # lines without the symbol set skipped
    ("Here it is:\nA,B,1,2\nB,A,2,1\n1,2,A,B\n2,1,B,A\nDone.", True),
    ("A,B,1,2\nA,B,1,2\n1,2,A,B\n2,1,B,A", False),                 # columns repeat
    ("A,B,1,2\nB,A,2,1\n1,2,A,B", False),                          # three rows
    ("A,B,1,2\nA,B,1,2\nB,A,2,1\n1,2,A,B\n2,1,B,A", False),        # a header row counts as row 1
    ("[A,B,1,2]\n[B,A,2,1]\n[1,2,A,B]\n[2,1,B,A]", False),         # brackets stick to the cells
    ("A;B;1;2\nB;A;2;1\n1;2;A;B\n2;1;B;A", False),
    ("a,b,1,2\nb,a,2,1\n1,2,a,b\n2,1,b,a", False),
])
def test_latin_square_scoring(text, ok):
    check(LATIN, text, ok, ok)  # latin_square_score ignores strict


SUDOKU = {"task": "sudoku", "answer": "1234\n3412\n2143\n4321", "puzzle": "1034\n3402\n2100\n4321"}


@pytest.mark.parametrize("text,correct,strict", [
    ("1234\n3412\n2143\n4321", True, True),
    ("1 2 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1", True, False),           # spaces removed only when loose
    ("1,2,3,4\n3,4,1,2\n2,1,4,3\n4,3,2,1", True, False),
    ("```\n1234\n3412\n2143\n4321\n```", True, False),              # fence lines hold no digits
    ("1234\n3412\n2143\n4321\nDone.", True, False),
    ("1234\n3412\n2143\n4312", False, False),                       # invalid grid
    ("1234\n3412\n4321\n2143", False, False),                       # a valid Sudoku, not the solution
    ("1034\n3402\n2100\n4321\n1234\n3412\n2143\n4321", False, False),  # input echoed: 8 rows
    ("12341\n34121\n21431\n43211", False, False),                   # five digits per row
    ("1234\n3412\n2143", False, False),
])
def test_sudoku_scoring(text, correct, strict):
    check(SUDOKU, text, correct, strict)


def test_extracted_values():
    assert pb.score({"task": "copy", "answer": ABC}, "x " + q(B, A))["extracted"] == [B, A]
    assert pb.score(SUDOKU, "1 2 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1")["extracted"] == [
        [1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]
    assert pb.score(SUDOKU, "12\n34")["extracted"] is None
    assert pb.score(LATIN, "x\nA,B,1,2\nB,A,2,1\n1,2,A,B\n2,1,B,A")["extracted"][1] == ["B", "A", "2", "1"]


def test_unknown_task_is_refused():
    with pytest.raises(KeyError, match="unknown ParallelBench task"):
        pb.score({"task": "waiting_line/copy", "answer": ABC}, ABC)


# --------------------------------------------------------------------------- parity with upstream's scorer

def test_scores_equal_upstream_scorer_on_every_fixture_prediction():
    with open(FIXTURE, encoding="utf-8") as f:
        header, *records = [json.loads(line) for line in f]
    assert header["commit"] == UPSTREAM_COMMIT and header["records"] == len(records) >= 200
    assert {r["task"] for r in records} == set(pb.TASKS)
    outcomes = set()
    for r in records:
        got = pb.score({"task": r["task"], "answer": r["answer"]}, r["text"])
        assert (float(got["correct"]), float(got["strict"])) == (r["score"], r["score_strict"]), r
        outcomes.add((r["score"], r["score_strict"]))
    assert outcomes == {(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)}


# --------------------------------------------------------------------------- data files

def test_data_files_regenerate_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_pb_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for task in pb.TASKS:
        for split in ("test", "train"):
            name = f"{task}_{split}.jsonl"
            with open(tmp_path / name, "rb") as mine, open(os.path.join(DATA, name), "rb") as committed:
                assert mine.read() == committed.read(), name


@pytest.mark.parametrize("task", pb.TASKS)
def test_counts_and_lengths(task):
    test, train = load(f"{task}_test.jsonl"), load(f"{task}_train.jsonl")
    buckets = pb.lengths(task)
    assert len(test) == 100 and len(train) == 200
    for rows, per in ((test, 100 // len(buckets)), (train, 200 // len(buckets))):
        assert {length: sum(r["length"] == length for r in rows) for length in buckets} == {b: per for b in buckets}
    assert [r["length"] for r in test] == sorted(r["length"] for r in test)     # upstream's order
    assert [r["id"] for r in test] == [f"{task}/test/{i}" for i in range(100)]
    assert [r["id"] for r in train] == [f"{task}/train/{i}" for i in range(200)]


@pytest.mark.parametrize("task", pb.TASKS)
def test_train_and_test_are_disjoint(task):
    test, train = load(f"{task}_test.jsonl"), load(f"{task}_train.jsonl")
    questions = {r["messages"][-1]["content"] for r in test}
    assert len(questions) == 100
    train_questions = {r["messages"][-1]["content"] for r in train}
    assert len(train_questions) == 200
    assert not questions & train_questions
    assert not questions & {r["messages"][0]["content"] for r in train}   # nor in-context examples


def test_train_rows_on_demand():
    rows = pb.train_rows("copy", 6000, seed=5)
    assert [r["id"] for r in rows[:3]] == ["copy/train/0", "copy/train/1", "copy/train/2"]
    assert [r["length"] for r in rows[:8]] == [3, 4, 5, 6, 3, 4, 5, 6]
    assert len({r["messages"][-1]["content"] for r in rows}) == 6000
    assert not pb.test_questions("copy") & {r["messages"][-1]["content"] for r in rows}
    assert len(pb.train_rows("sudoku", 7)) == 7


def render(task, row):
    fields = {"context": pb.quoted_list(row["list"])} if task in pb.WAITING_LINE else {}
    fields.update({k: row[k] for k in ("word", "index") if k in row})
    if task == "latin_square":
        fields.update(size=4, symbols="[" + ", ".join(row["symbols"]) + "]")
    if task == "sudoku":
        fields["sudoku"] = row["puzzle"]
    return pb.PROMPTS[task].format(**fields)


@pytest.mark.parametrize("task", pb.TASKS)
def test_messages_are_example_then_question(task):
    for row in load(f"{task}_test.jsonl"):
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant", "user"]
        assert row["messages"][-1]["content"] == render(task, row)
        assert row["target"] == (row["answer"] if isinstance(row["answer"], str) else row["answer"]["example"])
        got = pb.score(row, row["target"])
        assert got["correct"] and got["strict"]


def expected_list(task, row):
    names, out = row["list"], list(row["list"])
    op = task.split("_")[0]
    if op == "insert":
        position = row["index"] if "index" in row else pb.parse_list(row["target"]).index(row["word"])
        out.insert(position, row["word"])
    elif op == "remove" and "index" in row:
        out.pop(row["index"])
    elif op == "replace" and "index" in row:
        out[row["index"]] = row["word"]
    elif op in ("sort", "reverse"):
        out = sorted(names) if op == "sort" else names[::-1]
    return out


@pytest.mark.parametrize("task", pb.WAITING_LINE)
def test_waiting_line_shape(task):
    pool = set(pb.name_pool())
    assert len(pool) == 92 * 190
    rows = load(f"{task}_test.jsonl")
    for row in rows:
        names = row["list"]
        assert 3 <= len(names) <= 6 and len(set(names)) == len(names) and set(names) <= pool
        if "word" in row:
            assert row["word"] in pool and row["word"] not in names
        target = pb.parse_list(row["target"])
        if task in ("shuffle", "remove_random", "replace_random"):
            assert pb.score(row, row["target"])["correct"] and target != names
        else:
            assert target == expected_list(task, row)
    if task.endswith("_index"):
        top = 0 if task == "insert_index" else -1
        for length in pb.LIST_LENGTHS:
            seen = {r["index"] for r in rows if r["length"] == length}
            assert min(seen) == 0 and max(seen) == length + top


def test_puzzle_shape():
    for row in load("latin_square_test.jsonl"):
        assert len(set(row["symbols"])) == 4 and set(row["symbols"]) <= set(pb.LATIN_SYMBOLS)
        assert pb.score(row, row["target"])["correct"]
    grids = set(pb.sudoku_grids())
    assert len(grids) == 288
    for row in load("sudoku_test.jsonl"):
        assert row["puzzle"].count("0") == 4
        solution = tuple(int(c) for c in row["answer"].replace("\n", ""))
        givens = [(i, int(c)) for i, c in enumerate(row["puzzle"].replace("\n", "")) if c != "0"]
        assert [g for g in grids if all(g[i] == v for i, v in givens)] == [solution]   # unique


def test_suite_metrics():
    records = [{"task": "copy", "correct": True, "strict": True}, {"task": "copy", "correct": True, "strict": False},
               {"task": "sudoku", "correct": False, "strict": False}, {"task": "sudoku", "correct": True, "strict": True}]
    got = pb.suite_metrics(records)
    assert got["tasks"]["copy"] == {"n": 2, "accuracy": 100.0, "strict": 50.0}
    assert got["tasks"]["sudoku"] == {"n": 2, "accuracy": 50.0, "strict": 50.0}
    assert (got["mean_accuracy"], got["mean_strict"]) == (75.0, 50.0)
