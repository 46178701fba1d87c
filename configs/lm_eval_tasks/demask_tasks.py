"""Documents and judging of the demask lm-eval tasks: the harness's own prompts (demask/tasks.py
MATH_SYSTEM, CODE_SYSTEM; the system text reaches lm-eval through each document's `system` field and
the YAML's `description: "{{system}}"`, which lm-eval's --apply_chat_template makes the system
message) and its judges (utils.py: KLASS's math_is_correct; extract_code, make_completion and the
sandboxed check_code). A model that returns the harness's generations with their counted forwards
(demask.lmeval.DemaskText) also gets avg_steps; any other model gets nan there."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from demask.tasks import CODE_SYSTEM, MATH_SYSTEM, utils  # noqa: E402

LIMIT = 100  # the labels tiny-math and tiny-code evaluate the first 100 rows


def forwards(result):
    value = getattr(result, "forwards", None)
    return float("nan") if value is None else float(value)


def tiny_math_docs(dataset):
    return dataset.select(range(min(LIMIT, len(dataset)))).map(lambda doc: {"system": MATH_SYSTEM})


def tiny_code_docs(dataset):
    return dataset.select(range(min(LIMIT, len(dataset)))).map(lambda doc: {"system": CODE_SYSTEM})


def math_text(doc):
    return doc["problem"]


def code_text(doc):
    return doc["prompt"]


def math_results(doc, results):
    """MathTask.judge for one document: KLASS's answer extraction and comparison."""
    _, correct = utils.math_is_correct(doc["problem"], doc["solution"], results[0])
    return {"acc": float(bool(correct)), "avg_steps": forwards(results[0])}


def code_results(doc, results):
    """CodeTask.judge for one document: the first fenced block (or the text) made a completion of the
    prompt, run against the tests in the harness's sandbox, 3 s."""
    problem = {k: doc[k] for k in ("task_id", "prompt", "entry_point", "test")}
    completion = utils.make_completion(problem, utils.extract_code(results[0]))
    verdict = utils.check_code({problem["task_id"]: problem}, {problem["task_id"]: completion})[problem["task_id"]]
    return {"pass@1": float(bool(verdict["passed"])), "avg_steps": forwards(results[0])}
