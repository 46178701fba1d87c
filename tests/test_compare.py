"""Paired statistics of two runs (demask/compare.py, `compare RUN_A RUN_B`, the report's `≈` mark),
checked against hand-computed cases and two real tiny-math runs."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from demask import compare
from demask.settings import RunSettings

SCRIPT = os.path.join(REPO, "custom_demask_eval.py")


def cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


# ---------------------------------------------------------------------------
# McNemar, bootstrap: hand-computed


def test_mcnemar_exact_small_counts():
    # n = b + c discordant items; p = 2 * P(Binomial(n, 1/2) <= min(b, c)), at most 1
    assert compare.mcnemar_exact(1, 5) == 0.21875          # 2 * (1 + 6) / 64
    assert compare.mcnemar_exact(5, 1) == 0.21875          # symmetric
    assert compare.mcnemar_exact(0, 6) == 0.03125          # 2 / 64
    assert compare.mcnemar_exact(3, 1) == 0.625            # 2 * (1 + 4) / 16
    assert compare.mcnemar_exact(2, 10) == 2 * (1 + 12 + 66) / 4096
    for equal in (1, 3, 50):
        assert compare.mcnemar_exact(equal, equal) == 1.0
    assert compare.mcnemar_exact(0, 0) == 1.0 and compare.mcnemar_exact(0, 1) == 1.0
    assert compare.mcnemar_exact(0, 60) == 2.0 ** -59      # exact in integers, no underflow of the binomial sum
    with pytest.raises(ValueError):
        compare.mcnemar_exact(-1, 2)


def test_bootstrap_all_items_flip_one_way_is_a_point_and_the_sign_is_b_minus_a():
    a, b = [0] * 6, [1] * 6          # B right on every item A got wrong: every resample's mean difference is 1
    assert compare.paired_bootstrap(a, b, n_boot=1000) == (1.0, (1.0, 1.0))
    assert compare.paired_bootstrap(b, a, n_boot=1000) == (-1.0, (-1.0, -1.0))
    same = [1, 0, 1, 1]
    assert compare.paired_bootstrap(same, same) == (0.0, (0.0, 0.0))
    assert compare.interval_holds_zero(same, same) and not compare.interval_holds_zero(a, b)


def test_bootstrap_distribution_of_two_items():
    # differences (0, 1): a resample holds k copies of the second item with probability C(2, k) / 4, so its
    # mean is 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, and the 2.5 / 97.5 percentiles are 0 and 1
    means = compare.bootstrap_means(np.array([0.0, 1.0]), n_boot=10_000, seed=0)
    values, counts = np.unique(means, return_counts=True)
    assert list(values) == [0.0, 0.5, 1.0]
    assert np.allclose(counts / 10_000, [0.25, 0.5, 0.25], atol=0.02)
    assert compare.paired_bootstrap([0, 0], [0, 1]) == (0.5, (0.0, 1.0))
    # one of 200 items differs (B lower): a resample holds it with probability 1 - (199/200)^200 = 63 %, so
    # the interval's top is 0 and its bottom -1/200 or lower
    a, b = np.zeros(200), np.zeros(200)
    a[7] = 1
    diff, (lo, hi) = compare.paired_bootstrap(a, b)
    assert diff == -0.005 and hi == 0.0 and lo <= -0.005


def test_bootstrap_is_deterministic_paired_and_chunked(monkeypatch):
    rng = np.random.default_rng(5)
    d = rng.normal(size=37)
    one = compare.bootstrap_means(d, n_boot=500, seed=3)
    assert np.array_equal(one, compare.bootstrap_means(d, n_boot=500, seed=3))
    assert not np.array_equal(one, compare.bootstrap_means(d, n_boot=500, seed=4))
    both = compare.bootstrap_means(np.stack([d, 2 * d + 1]), n_boot=500, seed=3)
    assert np.array_equal(both[0], one) and np.allclose(both[1], 2 * one + 1)  # the same resamples for each column
    monkeypatch.setattr(compare, "CHUNK", 100)  # 2 resamples per draw: still 500 means of valid resamples
    chunked = compare.bootstrap_means(d, n_boot=500, seed=3)
    assert chunked.shape == (500,) and d.min() <= chunked.min() and chunked.max() <= d.max()


def test_bootstrap_is_fast():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    sa, sb = rng.integers(5, 64, 500), rng.integers(5, 64, 500)
    compare.bootstrap_means(np.stack([b - a, sb - sa]), n_boot=100)  # warm up
    start = time.perf_counter()
    compare.bootstrap_means(np.stack([b - a, sb - sa]), n_boot=10_000)  # what `compare` does: metric and steps
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------
# Pairing


def items(values, steps=None, task="math", data="data/tiny_math_test.jsonl", binary=True, decoder="klass"):
    run = RunSettings(task=task, data=data, label="tiny-math", decoder=decoder)
    values = {f"s{i}": float(v) for i, v in enumerate(values)} if isinstance(values, list) else values
    steps = steps or {i: 10 for i in values}
    return compare.RunItems("dir", run, "accuracy" if binary else "rep2", binary, values, steps)


def test_compare_items_counts_flips_and_steps():
    a = items([1, 1, 1, 0, 0, 1], steps={f"s{i}": s for i, s in enumerate([10, 12, 8, 10, 10, 10])})
    b = items([1, 0, 1, 1, 1, 1], steps={f"s{i}": 5 for i in range(6)}, decoder="threshold")
    c = compare.compare_items(a, b, n_boot=2000)
    assert (c.a_only, c.b_only, c.n_items) == (1, 2, 6)
    assert c.mcnemar_p == 1.0 and c.diff == pytest.approx(1 / 6)
    assert c.a["accuracy"] == pytest.approx(4 / 6) and c.b["accuracy"] == pytest.approx(5 / 6)
    assert c.steps_diff == -5.0 and c.steps_ci[0] < -5.0 < c.steps_ci[1] and c.a["avg_steps"] == 10.0
    back = compare.compare_items(b, a, n_boot=2000)  # swapped: every difference changes sign
    assert (back.a_only, back.b_only, back.diff) == (2, 1, -c.diff)
    text = compare.format_comparison(c)
    assert "B − A +0.1667" in text and "only in A: 1, only in B: 2; McNemar exact p = 1" in text
    data = json.loads(json.dumps(c.to_json()))
    assert data["sign"] == "B - A" and data["a_only"] == 1 and data["steps_diff"] == -5.0 and data["n_boot"] == 2000


def test_text_metric_has_no_mcnemar():
    a = items([0.5, 0.0, 0.2, 0.1], binary=False, task="text", data="c4")
    b = items([0.3, 0.0, 0.4, 0.0], binary=False, task="text", data="c4")
    c = compare.compare_items(a, b, n_boot=1000)
    assert c.mcnemar_p is None and c.a_only is None and (c.b_higher, c.b_lower) == (1, 2)
    assert c.diff == pytest.approx(-0.025) and "no McNemar" in compare.format_comparison(c)


def test_runs_on_different_samples_or_tasks_are_refused():
    a = items([1, 0, 1, 1])
    with pytest.raises(compare.Mismatch, match=r"different sample sets: 2 sample id\(s\) are in only one"):
        compare.compare_items(a, items({"s0": 1.0, "s1": 0.0, "s2": 1.0, "x": 1.0}))
    with pytest.raises(compare.Mismatch, match="1 sample id"):
        compare.compare_items(a, items([1, 0, 1]))
    with pytest.raises(compare.Mismatch, match="different tasks"):
        compare.compare_items(a, items([1, 0, 1, 1], task="gsm8k"))
    with pytest.raises(compare.Mismatch, match="different data files"):
        compare.compare_items(a, items([1, 0, 1, 1], data="data/other.jsonl"))


# ---------------------------------------------------------------------------
# Two real tiny-math runs: the CLI and the report


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    results = tmp_path_factory.mktemp("compare_results")
    for decoder in ("klass", "threshold"):
        out = cli("--label", "tiny-math", "--limit", 20, "--decoder", decoder, "--results_dir", results)
        assert out.returncode == 0, out.stderr
    klass, threshold = (next((results / "tiny-math").glob(f"{d}-*")) for d in ("klass", "threshold"))
    return results, klass, threshold


def records(run):
    return {r["id"]: r for r in map(json.loads, open(run / "samples.jsonl"))}


def test_cli_compares_two_tiny_math_runs(two_runs):
    _, klass, threshold = two_runs
    out = cli("compare", klass, threshold, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    ra, rb = records(klass), records(threshold)
    assert sorted(ra) == sorted(rb) and len(ra) == 20
    a_only = sum(ra[i]["correct"] and not rb[i]["correct"] for i in ra)
    b_only = sum(rb[i]["correct"] and not ra[i]["correct"] for i in ra)
    steps = np.mean([rb[i]["steps"] - ra[i]["steps"] for i in ra])
    assert (got["a_only"], got["b_only"], got["n_items"]) == (a_only, b_only, 20)
    assert got["mcnemar_p"] == compare.mcnemar_exact(a_only, b_only)
    assert got["diff"] == pytest.approx((b_only - a_only) / 20) and got["steps_diff"] == pytest.approx(steps)
    summary = json.load(open(klass / "summary.json"))["metrics"]
    assert got["a"]["accuracy"] == pytest.approx(summary["accuracy"])
    assert got["ci"][0] <= got["diff"] <= got["ci"][1] and got["steps_ci"][0] <= steps <= got["steps_ci"][1]
    assert (got["n_boot"], got["seed"], got["level"]) == (10_000, 0, 0.95)
    again = cli("compare", klass, threshold, "--json")
    assert json.loads(again.stdout) == got                      # fixed seed: the same interval every time
    other = json.loads(cli("compare", klass, threshold, "--json", "--bootstrap", 500, "--seed", 9).stdout)
    assert other["n_boot"] == 500 and other["seed"] == 9
    text = cli("compare", klass, threshold)
    assert text.returncode == 0 and "differences are B − A" in text.stdout and "McNemar exact p = " in text.stdout


def test_cli_refuses_other_sample_sets_and_unreadable_runs(two_runs, tmp_path):
    _, klass, threshold = two_runs
    fewer = tmp_path / "fewer"
    shutil.copytree(threshold, fewer)
    lines = open(fewer / "samples.jsonl").readlines()
    open(fewer / "samples.jsonl", "w").writelines(lines[:17])  # 3 samples unfinished
    out = cli("compare", klass, fewer)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: the runs are on different sample sets: 3 sample id(s) are in only one of them "
        "(20 records in A, 17 in B)"]

    edited = tmp_path / "edited"  # a verdict edited by hand: the re-judged records disagree, never trusted
    shutil.copytree(threshold, edited)
    rows = [json.loads(line) for line in lines]
    rows[0]["correct"] = not rows[0]["correct"]
    open(edited / "samples.jsonl", "w").writelines(json.dumps(r) + "\n" for r in rows)
    out = cli("compare", klass, edited)
    assert out.returncode == 4 and "its stored correct" in out.stderr

    out = cli("compare", klass, tmp_path)  # a folder that is no run: no config.json
    assert out.returncode == 4 and "config.json" in out.stderr
    assert cli("compare", klass, tmp_path / "nowhere").returncode == 2
    assert cli("compare", klass).returncode == 2
    assert cli("compare", klass, threshold, "--bootstrap", 0).returncode == 2


def test_report_marks_rows_within_the_interval_of_the_best(two_runs, tmp_path):
    results, klass, threshold = two_runs
    ra, rb = records(klass), records(threshold)
    scores = {"klass": np.mean([r["correct"] for r in ra.values()]),
              "threshold": np.mean([r["correct"] for r in rb.values()])}
    best, other = sorted(scores, key=lambda d: (-scores[d], d != "klass"))  # ties: klass's row comes first
    c = json.loads(cli("compare", *(klass, threshold) if best == "klass" else (threshold, klass), "--json").stdout)
    out = cli("report", results, "--out", tmp_path / "report.md")
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "report.md").read_text()
    board = md.split("### Leaderboard (accuracy labels)", 1)[1].split("\n### ", 1)[0]
    rows = {line.split(" | ")[0][2:]: [x.strip() for x in line.strip("|").split("|")]
            for line in board.splitlines() if line.startswith("| klass |") or line.startswith("| threshold |")}
    assert len(rows) == 2
    marked = c["ci"][0] <= 0 <= c["ci"][1]
    assert rows[best][5] == f"{100 * scores[best]:.1f}"                                   # the best row: no mark
    assert rows[other][5] == f"{100 * scores[other]:.1f}" + (" ≈" if marked else "")
    assert "- `≈` after an acc / pass@1 score: not significantly different" in md

    # a run on other samples (here 17 of the 20) is never marked
    moved = tmp_path / "results"
    shutil.copytree(results, moved)
    run = moved / "tiny-math" / (threshold if other == "threshold" else klass).name
    kept = open(run / "samples.jsonl").readlines()[:17]
    open(run / "samples.jsonl", "w").writelines(kept)
    summary = json.load(open(run / "summary.json"))
    kept = [json.loads(line) for line in kept]
    summary["metrics"].update({"accuracy": float(np.mean([r["correct"] for r in kept])), "n_samples": 17.0,
                               "avg_steps": float(np.mean([r["steps"] for r in kept]))})
    json.dump(summary, open(run / "summary.json", "w"))
    assert cli("report", moved, "--out", tmp_path / "moved.md").returncode == 0
    board = (tmp_path / "moved.md").read_text()
    assert f"| {other} |" in board and "≈" not in board.split("### Leaderboard", 1)[1]
