"""samples.jsonl for made-up run directories (report tests): the records a run with its
summary.json's metrics has, as the harness writes them.

The report re-derives every run from its samples.jsonl (demask/verdicts.py), so a results folder
made of summary.json files alone shows no run. These records are honest: each verdict is the one
the task's own judge gives the generation (code: in the sandbox, through the verdict cache), the
first round(score * n) samples get a right generation (math: the reference solution; code: the
canonical solution; text: a repetitive continuation, rep2 0.5, the others rep2 0), and the steps
add up to avg_steps * n."""
import json
import os

from demask import verdicts
from demask.records import json_line
from demask.tasks import TASKS, CodeTask, TextTask

WRONG = {"math": "So the final answer is \\boxed{-12345}", "gsm8k": "The final answer is -12345",
         "humaneval": "```python\nreturn None\n```", "text": " and so on."}


def generation(task, sample, right):
    if isinstance(task, TextTask):
        return " ok ok ok" if right else WRONG["text"]
    if isinstance(task, CodeTask):
        problem = task.problems[sample["id"]]
        return f"```python\n{problem['prompt']}{problem['canonical_solution']}```" if right else WRONG["humaneval"]
    return sample["solution"] if right else WRONG[task.name]


def write_samples(run_dir, cache=None):
    """samples.jsonl of run_dir from its summary.json (config: task, data, limit; metrics: the score,
    avg_steps, n_samples). Returns the records."""
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    run, metrics = verdicts.settings_from_config(summary["config"]), summary["metrics"]
    task = TASKS[run.task]()
    n = int(metrics["n_samples"])
    samples = task.load(run)[:run.limit][:n]
    score = metrics["rep2"] / 0.5 if isinstance(task, TextTask) else metrics[task.final]
    k = round(score * n)
    texts = [generation(task, s, i < k) for i, s in enumerate(samples)]
    if isinstance(task, CodeTask):
        claimed = {s["id"]: (i < k, "passed" if i < k else "failed: ") for i, s in enumerate(samples)}
        cache = cache or verdicts.VerdictCache()
        judged = task.judge(samples, texts, check=verdicts.cached_check(cache, claimed))
        cache.save()
    else:
        judged = task.judge(samples, texts)
    total = round(metrics["avg_steps"] * n)
    records = []
    for i, (s, text, verdict) in enumerate(zip(samples, texts, judged)):
        steps = total // n + (i < total % n)
        records.append(dict(id=s["id"], prompt=s.get("prefix") or s["messages"][-1]["content"], generation=text,
                            stopped=True, **verdict, steps=steps, reported_steps=steps, steps_mismatch=False,
                            seed=run.seed, seconds=0.1))
    with open(os.path.join(run_dir, "samples.jsonl"), "w") as f:
        f.writelines(json_line(r) for r in records)
    derived = verdicts.cheap_metrics(task, records)
    assert not verdicts.metric_differences(metrics, derived), (run_dir, metrics, derived)
    return records


def add_samples(results):
    """write_samples for every run directory under `results` with a readable summary.json."""
    cache = verdicts.VerdictCache()
    for root, _, files in os.walk(results):
        if "summary.json" in files and "samples.jsonl" not in files:
            try:
                json.load(open(os.path.join(root, "summary.json")))
            except ValueError:
                continue  # a broken summary stays broken
            write_samples(root, cache)
