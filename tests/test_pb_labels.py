"""ParallelBench labels end to end: the pb task kind, suite and per-task labels, a plugin on the copy
task in one command, and the report's ParallelBench section (per-task table, PBx over tasks, plots)."""
import json
import re

import pytest

import custom_demask_eval as cde
from demask import parallelbench, report, tasks
from test_tiny import run_label

PLUGIN = '''
from custom_demask_eval import TopKDecoder, register_method


class RightToLeft(TopKDecoder):
    """Commit the k rightmost masked positions."""

    def rank(self, p, tokens, conf):
        import torch
        return torch.arange(p.shape[1], device=p.device, dtype=torch.float64)[None].expand(p.shape[0], -1)


register_method("right_to_left", RightToLeft, method_type="topk", representative_param="k")
'''


def test_every_task_has_a_label_per_model_at_its_answer_length():
    for prefix in ("llada", "dream", "tiny"):
        suite = cde.LABELS[f"{prefix}-pb"]
        assert (suite.task, suite.data, suite.gen_length, suite.steps) == ("pb", "data/pb", 32, 32)
        for task in parallelbench.TASKS:
            run = cde.LABELS[f"{prefix}-pb-{task}"]
            n = 64 if task in ("sudoku", "latin_square") else 32
            assert (run.task, run.data) == ("pb", f"data/pb/{task}_test.jsonl")
            assert (run.gen_length, run.steps, run.block_length, run.temperature) == (n, n, n, 0.0)


def test_suite_interleaves_the_waiting_line_tasks():
    samples = tasks.PbTask().load(cde.LABELS["tiny-pb"])
    assert len(samples) == 100 * len(parallelbench.WAITING_LINE)
    assert [s["task"] for s in samples[:10]] == list(parallelbench.SUITE)
    assert {s["task"] for s in samples} == set(parallelbench.WAITING_LINE)


def test_metrics_are_per_task_then_their_mean():
    records = [dict(task="copy", correct=True, strict=True), dict(task="copy", correct=False, strict=False),
               dict(task="shuffle", correct=True, strict=False), dict(task="sort", correct=False, strict=False),
               dict(task="sort", correct=False, strict=False), dict(task="sort", correct=True, strict=True)]
    metrics = tasks.PbTask().metrics(records)
    assert list(metrics) == ["accuracy", "strict_accuracy", "copy_accuracy", "shuffle_accuracy", "sort_accuracy"]
    assert metrics["accuracy"] == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)  # tasks weigh equally, not samples
    assert metrics["strict_accuracy"] == pytest.approx((0.5 + 0.0 + 1 / 3) / 3)
    assert tasks.PbTask().metrics(records[:2]) == {"accuracy": 0.5, "strict_accuracy": 0.5}


def test_tiny_pb_suite_end_to_end(tmp_path):
    out = run_label(tmp_path, "tiny-pb", "--limit", "20", "--decoder", "confidence_greedy")
    assert re.search(r"^TRAIN_METRICS: pb 20/20 acc=\d\.\d{3} avg_steps=32\.0$", out, re.M)
    values = dict(re.findall(r"^(\S+)_tiny-pb: (\d+\.\d{4})$", out, re.M))
    per_task = [float(values[f"{t}_accuracy"]) for t in parallelbench.SUITE]
    assert float(values["accuracy"]) == pytest.approx(sum(per_task) / len(per_task), abs=1e-4)
    assert values["avg_steps"] == "32.0000" and values["n_samples"] == "20.0000"
    (run,) = (tmp_path / "tiny-pb").iterdir()
    records = [json.loads(line) for line in open(run / "samples.jsonl")]
    assert sorted(r["task"] for r in records) == sorted(list(parallelbench.SUITE) * 2)
    for r in records:  # each verdict is ParallelBench's score of the generation
        row = next(s for s in tasks.PbTask().load(cde.LABELS["tiny-pb"]) if s["id"] == r["id"])
        assert {k: r[k] for k in ("correct", "strict", "extracted")} == parallelbench.score(row, r["generation"])


def test_a_registered_method_runs_on_the_copy_task_in_one_command(tmp_path):
    plugin = tmp_path / "right_to_left.py"
    plugin.write_text(PLUGIN)
    out = run_label(tmp_path / "results", "tiny-pb-copy", "--plugin", str(plugin), "--decoder", "right_to_left",
                    "--limit", "4", "--steps", "16")
    assert re.search(r"^accuracy_tiny-pb-copy: \d\.\d{4}$", out, re.M) and "avg_steps_tiny-pb-copy: 16.0000" in out


def test_report_has_the_parallelbench_section(tmp_path):
    results = tmp_path / "results"
    for label in ("tiny-pb-copy", "tiny-pb-shuffle"):
        for decoder, steps in (("confidence_greedy", "32"), ("confidence_greedy", "8"), ("threshold", "32")):
            run_label(results, label, "--decoder", decoder, "--steps", steps, "--limit", "6")
    out, n = report.write_report(str(results), str(tmp_path / "report.md"),
                                 {name: run.to_json() for name, run in cde.LABELS.items()}, list(cde.RUN_KEYS))
    assert n == 6
    md = open(out).read()
    section = md.split("### ParallelBench tasks (tiny-pb)")[1].split("\n### ")[0]
    table = section.split("PBx over")[0]
    rows = [line for line in table.splitlines() if line.startswith(("| confidence_greedy", "| threshold"))]
    assert "| decoder | settings | copy | shuffle | mean |" in section
    assert len(rows) == 3  # k=1, k=4 and the threshold's configuration, each over both tasks
    assert rows[0].startswith("| confidence_greedy | k=1 | ")
    k4 = next(line for line in rows if "k=4" in line)
    assert re.fullmatch(r"\| confidence_greedy \| k=4 \| \d+ \(4\.00\) \| \d+ \(4\.00\) \| [\d.]+ \(4\.00\) \|", k4)
    assert "PBx over 2 task(s)" in section and "| all methods | 3 |" in section
    for task in ("copy", "shuffle"):
        png = tmp_path / f"pb_tiny-pb_{task}.png"
        assert png.stat().st_size > 1000 and f"({png.name})" in section
