"""Sweeps through the CLI (one model load, resume, skip) and the report from a fixture results folder."""
import builtins
import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

import custom_demask_eval as cde
from demask import report
from conftest import REPO
from honest_samples import add_samples

FIXTURE = os.path.join(REPO, "tests", "fixtures", "report_results")
SMALL = ["--label", "llada-math", "--limit", "2", "--batch_size", "2", "--gen_length", "4", "--block_length", "4"]


def test_parse_sweep():
    got = cde.parse_sweep("threshold:alg_threshold=0.5,0.9;factor:alg_factor=1,2,block_length=32,64; klass")
    assert got == [("threshold", {"alg_threshold": 0.5}), ("threshold", {"alg_threshold": 0.9}),
                   ("factor", {"alg_factor": 1, "block_length": 32}), ("factor", {"alg_factor": 1, "block_length": 64}),
                   ("factor", {"alg_factor": 2, "block_length": 32}), ("factor", {"alg_factor": 2, "block_length": 64}),
                   ("klass", {})]
    assert cde.parse_sweep("remdm:sigma=cap,conf") == [("remdm", {"sigma": "cap"}), ("remdm", {"sigma": "conf"})]
    for bad in ("", "threshold:alg_threshold", "threshold:a=1,a=2", ":a=1"):
        with pytest.raises(ValueError):
            cde.parse_sweep(bad)


def test_sweep_via_cli_writes_one_run_dir_per_config_and_resumes(tmp_path, tiny_llada, monkeypatch, capsys):
    sweep = "confidence_greedy:steps=4,2"
    out = subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), *SMALL, "--model_path",
                          tiny_llada, "--results_dir", str(tmp_path), "--sweep", sweep], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    runs = sorted((tmp_path / "llada-math").iterdir())
    assert [r.name.split("-")[:2] for r in runs] == [["confidence_greedy", "steps=2"], ["confidence_greedy", "steps=4"]]
    steps = {json.load(open(r / "summary.json"))["config"]["steps"]: json.load(open(r / "summary.json"))["metrics"]
             for r in runs}
    assert steps[4]["avg_steps"] == 4.0 and steps[2]["avg_steps"] == 2.0 and steps[4]["n_samples"] == 2
    assert out.stdout.count("sweep: confidence_greedy-") == 2

    # a rerun skips both without loading the model
    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    args = [*SMALL, "--model_path", tiny_llada, "--results_dir", str(tmp_path), "--sweep", sweep]
    results = cde.main(args)
    assert [m["avg_steps"] for _, m in results] == [4.0, 2.0]
    assert capsys.readouterr().err.count("is complete, skipped") == 2
    monkeypatch.undo()

    # an interrupted configuration (one sample written, no summary) is resumed in its directory
    run = [r for r in runs if "steps=4" in r.name][0]
    lines = open(run / "samples.jsonl").readlines()
    with open(run / "samples.jsonl", "w") as f:
        f.write(lines[0])
    os.remove(run / "summary.json")
    results = cde.main(args)
    assert sorted((tmp_path / "llada-math").iterdir()) == runs
    assert len(open(run / "samples.jsonl").readlines()) == 2
    assert json.load(open(run / "summary.json"))["metrics"] == steps[4]


def test_sweep_rejects_bad_configs_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for sweep, message in [("threshold:bogus=1", "no parameter(s) ['bogus']"), ("nope", "unknown decoder 'nope'"),
                           ("confidence_greedy:steps=3", "not divisible"), ("threshold:alg_threshold", "--sweep")]:
        with pytest.raises(SystemExit) as exit_info:
            cde.main(["--label", "llada-math", "--sweep", sweep])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_pbx_and_aup_definitions():
    assert report.pb_scores([(95, 1), (93, 2), (85, 4)]) == {90: 2, 80: 4, 70: 4, 60: 4}
    assert report.pb_scores([(40, 2)]) == {90: None, 80: None, 70: None, 60: None}
    # threshold / factor / adaptive methods: TPS interpolated at the rightmost crossing of x, the best
    # score per TPS kept; the largest TPS when it reaches x
    pb = report.pb_scores([(96, 1.0), (92, 2.0), (50, 2.0), (84, 4.0), (72, 6.0), (95, 0.5)], interpolate=True)
    assert pb == {90: pytest.approx(2.0 + 2 * 2 / 8), 80: pytest.approx(4.0 + 4 * 2 / 12),
                  70: 6.0, 60: 6.0}
    assert report.pb_scores([(85, 1.0), (20, 3.0)], interpolate=True) == {
        90: None, 80: pytest.approx(1.0 + 5 * 2 / 65), 70: pytest.approx(1.0 + 15 * 2 / 65),
        60: pytest.approx(1.0 + 25 * 2 / 65)}
    value, flagged = report.aup([(5, 88), (3.2, 92)], y_max=96)
    w = lambda y: min(math.exp(-3 * (1 - y / 96)), 1)
    assert not flagged and value == pytest.approx(3.2 * 92 + 0.5 * 1.8 * (92 * w(92) + 88 * w(88)))
    value, flagged = report.aup([(1, 95), (2, 93), (4, 85)], y_max=96)  # 85 < 95 - 5: dropped, flagged
    assert flagged and value == pytest.approx(95 + 0.5 * (95 * w(95) + 93 * w(93)))
    a, b, c, d = (report.ParetoPoint(*p) for p in [(10, 50, "a", "a"), (5, 40, "b", "b"), (20, 50, "c", "c"),
                                                   (30, 60, "d", "d")])
    assert report.pareto_front([a, b, c, d]) == [b, a, d]


def table_row(report, first_cells):
    rows = [l for l in report.splitlines() if l.startswith("| " + " | ".join(first_cells) + " |")]
    assert len(rows) == 1, (first_cells, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def section(report, title):
    return report.split(title, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


def test_report_from_fixture_results(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    add_samples(results)  # the fixture's summaries alone: no run can be re-derived, none is shown
    os.utime(results / "tiny-math" / "thr-0.9-partial" / "summary.json", (0, 0))
    cde.main(["report", str(results)])
    report = (results / "report.md").read_text()
    for png in ("pareto_tiny-code.png", "pareto_tiny-math_tiny-llada.png", "pareto_tiny-math_model.png",
                "pareto_tiny-text_gpt2-large.png", "pareto_tiny-text_smollm2-135m.png"):
        assert (results / png).stat().st_size > 1000 and f"({png})" in report
    assert "tiny-text/broken/summary.json" in report  # reported, skipped

    tiny, other = report.split("## Model `other/model`")
    assert "## Model `models/tiny-llada`" in tiny
    board, text_board = section(tiny, "### Leaderboard (accuracy labels)"), section(tiny, "### Leaderboard (text labels)")
    # leaderboard: tiny-code columns first (labels sorted), then tiny-math
    # `≈`: within the 95 % paired bootstrap interval of the label's best row (tiny-math: klass, 192/200 right;
    # the honest samples nest, so 95.0 = 2 items only klass got right, and (198/200)^200 = 13 % > 2.5 % of the
    # resamples hold neither: the interval reaches 0; 93.0 = 6 such items, (194/200)^200 = 0.2 %: it does not)
    assert table_row(board, ["confidence_greedy", "topk", "k=1"])[5:] == (
        ["80.0", "64.0", "1.00", "—", "—", "—", "200", "95.0 ≈", "64.0", "1.00", "—", "—", "—", "200", "2"])
    assert table_row(board, ["confidence_greedy", "topk", "k=2", "steps=32"])[5:] == (
        ["70.0", "32.0", "2.00", "—", "—", "—", "200", "93.0", "32.0", "2.00", "—", "—", "—", "200", "2"])
    assert board.count("≈") == 1 and "- `≈` after an acc / pass@1 score" in tiny
    # the 200-sample run wins over the older 50-sample one of the same configuration
    threshold = table_row(board, ["threshold", "threshold", "alg_threshold=0.9"])
    assert threshold[12:] == ["92.0", "20.0", "3.20", "—", "—", "—", "200", "3"]
    assert table_row(section(other, "### Leaderboard (accuracy labels)"), ["confidence_greedy", "topk", "k=1"])[5:] == (
        ["50.0", "64.0", "1.00", "—", "—", "—", "200", "1"])
    # text rows keyed by scorer LM; the scorer actually used (details, after a fallback) wins
    assert table_row(text_board, ["klass", "adaptive", "kl_threshold=0.01", "—", "confidence", "gpt2-large"])[6:] == (
        ["25.10", "45.00", "5.00", "0.110", "30.0", "1.60", "—", "—", "—", "200", "1"])
    assert table_row(text_board, ["klass", "adaptive", "kl_threshold=0.01", "—", "confidence", "smollm2-135m"])[6] == "30.50"
    assert table_row(text_board, ["threshold", "threshold", "alg_threshold=0.9"])[5:8] == ["smollm2-135m", "40.00", "30.00"]
    assert "Front: threshold alg_threshold=0.9 (30.0 @ 12.0 steps); klass (42.0 @ 30.0 steps)" in (
        section(tiny, "### tiny-text, scorer smollm2-135m: Pareto front"))
    assert "Front: klass (45.0 @ 30.0 steps)" in section(tiny, "### tiny-text, scorer gpt2-large: Pareto front")

    # PBx (TPS = k for top-k, G/NFE otherwise) and AUP (alpha 3, y_max 96), checked by hand
    math_pb = section(tiny, "### tiny-math: PBx and AUP")
    assert table_row(math_pb, ["confidence_greedy"]) == ["confidence_greedy", "3", "2.00", "4.00", "4.00", "4.00", "183.38*"]
    # threshold: interpolated between (3.2, 92) and (5.0, 88): PB90 = 3.2 + 2 * 1.8 / 4
    assert table_row(math_pb, ["threshold"]) == ["threshold", "2", "4.10", "5.00", "5.00", "5.00", "429.15"]
    assert table_row(math_pb, ["klass"]) == ["klass", "1", "1.60", "1.60", "1.60", "1.60", "153.60"]
    assert table_row(math_pb, ["random"]) == ["random", "1", "—", "—", "—", "—", "80.00"]
    assert table_row(math_pb, ["all methods"]) == ["all methods", "7", "3.20", "5.00", "5.00", "5.00", "—"]
    code_pb = section(tiny, "### tiny-code: PBx and AUP")
    assert table_row(code_pb, ["confidence_greedy"]) == ["confidence_greedy", "2", "—", "1.00", "2.00", "2.00", "80.00*"]
    assert table_row(code_pb, ["threshold"]) == ["threshold", "1", "—", "—", "4.00", "4.00", "300.00"]
    # over both labels: (87.5, 1), (81.5, 2), (83.5, 3.6) for the configurations run on both
    both = section(tiny, "### All accuracy labels (tiny-code, tiny-math): PBx")
    assert "| — | 3.60 | 3.60 | 3.60 |" in both
    assert ("Front: threshold alg_threshold=0.7 (88.0 @ 12.8 steps); threshold alg_threshold=0.9 (92.0 @ 20.0 steps); "
            "confidence_greedy steps=32 (93.0 @ 32.0 steps); klass (96.0 @ 40.0 steps)" in tiny)

    csv_lines = (results / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 15 and csv_lines[0].startswith("model,label,decoder,method_type")


def test_report_needs_runs(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cde.main(["report", str(tmp_path)])
    assert exit_info.value.code == 2


def test_pareto_front_respects_error_bars():
    points = [report.ParetoPoint(*p) for p in [(10, 80, "a", "a", 2.0), (12, 79, "b", "b", 2.0),
                                               (14, 70, "c", "c", 1.0), (20, 90, "d", "d", 0.0)]]
    front = report.pareto_front(points)
    assert [p.family for p in front] == ["a", "b", "d"]  # b is within a's error bars; c is not
    assert [p.family for p in report.pareto_front([p._replace(score_std=0.0) for p in points])] == ["a", "d"]
    # scripts/eval_policy.py passes plain tuples in the fields' order
    P = report.ParetoPoint
    assert report.dominates(P(10, 80, "a", "a", 0.0), P(12, 79, "b", "b", 0.0))
    assert not report.dominates(P(10, 80, "a", "a", 2.0), P(12, 79, "b", "b", 2.0))


def test_seeds_run_aggregates_and_report_shows_error_bars(tmp_path, tiny_llada):
    out = subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), *SMALL, "--model_path",
                          tiny_llada, "--results_dir", str(tmp_path), "--decoder", "random", "--seeds", "1,2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (group,) = (tmp_path / "llada-math").glob("*-seeds")
    summary = json.load(open(group / "seeds_summary.json"))
    per_seed = [json.load(open(group / run / "summary.json"))["metrics"]["accuracy"] for run in summary["runs"]]
    acc = summary["metrics"]["accuracy"]
    assert summary["seeds"] == [1, 2] and acc["n"] == 2 and acc["mean"] == sum(per_seed) / 2
    assert acc["min"] == min(per_seed) and acc["max"] == max(per_seed)
    assert math.isclose(acc["std"], abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    lines = out.stdout.splitlines()
    assert f"accuracy_llada-math: {acc['mean']:.4f} ± {acc['std']:.4f}" in lines
    assert lines[-3:] == [f"accuracy_llada-math: {acc['mean']:.4f}", "avg_steps_llada-math: 4.0000",
                          "n_samples_llada-math: 2.0000"]
    again = subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), *SMALL, "--model_path",
                            tiny_llada, "--results_dir", str(tmp_path), "--decoder", "random", "--seeds", "1,2"],
                           capture_output=True, text=True, timeout=600)
    assert again.stderr.count("is complete, skipped") == 2
    cde.main(["report", str(tmp_path)])
    board = (tmp_path / "report.md").read_text()
    row = next(line for line in board.splitlines() if line.startswith("| random |"))
    assert "2×2 seeds" in row and (" ± " in row or acc["std"] == 0)


def write_traces(run_dir, n=3):
    """A trace on the first n records of the run's samples.jsonl."""
    trace = dict(forwards=2, tokens=[5, 6, 7, 8], commit_step=[0, 0, 1, 1], confidence=[0.9] * 4, undone=[])
    records = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    with open(run_dir / "samples.jsonl", "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(dict(r, trace=trace) if i < n else r) + "\n")


def test_report_reads_each_samples_file_at_most_once(tmp_path, monkeypatch):
    """Every run's samples.jsonl is read once: to re-derive its verdicts and metrics; the order
    figures and report.html show the traces of those records (a cell of two seeds: its newer run)."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    math_runs = results / "tiny-math"
    os.utime(math_runs / "thr-0.9-partial" / "summary.json", (0, 0))
    summary = json.load(open(math_runs / "klass" / "summary.json"))
    summary["config"]["seed"] += 1
    (math_runs / "klass-seed2").mkdir()
    json.dump(summary, open(math_runs / "klass-seed2" / "summary.json", "w"))
    add_samples(results)
    os.utime(math_runs / "klass" / "summary.json", (1, 1))
    for run in ("cg-k1", "cg-k2", "thr-0.9", "thr-0.9-partial", "klass", "klass-seed2"):
        write_traces(math_runs / run)
    write_traces(results / "tiny-code" / "cg-k1")

    opened, real_open = collections.Counter(), builtins.open

    def counting_open(file, *args, **kwargs):
        if os.path.basename(str(file)) == "samples.jsonl":
            opened[os.path.relpath(os.path.dirname(file), results)] += 1
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", counting_open)
    cde.main(["report", str(results)])
    monkeypatch.undo()

    shown = ["tiny-code/cg-k1", "tiny-math/cg-k1", "tiny-math/cg-k2", "tiny-math/klass-seed2", "tiny-math/thr-0.9"]
    every = [os.path.relpath(root, results) for root, _, files in os.walk(results) if "samples.jsonl" in files]
    assert len(every) == 16 and opened == collections.Counter(every)
    board = (results / "report.md").read_text()
    klass = table_row(board, ["klass", "adaptive", "kl_threshold=0.01", "—", "confidence", "—"])
    assert klass[-2] == "200×2 seeds"
    page = (results / "report.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)[1])
    figures = [f"order_{run.replace('/', '_')}.png" for run in shown]
    assert sorted(r["figure"] for r in data["runs"]) == figures
    assert all(len(r["samples"]) == 3 and f"({r['figure']})" in board and (results / r["figure"]).exists()
               for r in data["runs"])
