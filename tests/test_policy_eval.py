"""scripts/eval_policy.py: policies beside the reference decoders, and the tiny-math bar's verdict."""
import csv
import os
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import eval_policy  # noqa: E402
from demask import report  # noqa: E402


def pt(name, steps, accuracy, std=0.0):
    return report.ParetoPoint(steps, accuracy, name.split()[0], name, std)


FULLY_PARALLEL = [pt("threshold alg_threshold=0.8", 2.9, 0.73), pt("threshold alg_threshold=0.9", 3.3, 0.77),
                  pt("eb_sampler", 3.8, 0.74), pt("klass", 8.6, 0.75)]


def test_fully_parallel_bar_is_the_front_and_a_strictly_dominated_reference():
    assert eval_policy.bar_verdict(pt("policy", 3.4, 0.77, 0.01), FULLY_PARALLEL, True) == (
        True, "on the front: yes; strictly dominates: eb_sampler, klass")
    # 0.02 below threshold 0.9 with more steps, outside its error bar: off the front
    assert eval_policy.bar_verdict(pt("policy", 3.4, 0.75, 0.01), FULLY_PARALLEL, True)[0] is False
    # on the front, but faster than everything it would beat
    assert eval_policy.bar_verdict(pt("policy", 2.0, 0.60), FULLY_PARALLEL, True) == (
        False, "on the front: yes; strictly dominates: none")
    # a copy of a reference neither is on the front (the tie goes to the reference) nor beats it
    assert eval_policy.bar_verdict(pt("policy", 8.6, 0.75), [pt("klass", 8.6, 0.75)], True) == (
        False, "on the front: no; strictly dominates: none")


def test_semi_ar_bar_is_threshold_09_less_002_at_no_more_steps():
    references = [pt("threshold alg_threshold=0.85", 4.1, 0.76), pt("threshold alg_threshold=0.9", 4.43, 0.76)]
    assert eval_policy.bar_verdict(pt("policy", 4.43, 0.745), references, False)[0] is True
    assert eval_policy.bar_verdict(pt("policy", 4.5, 0.80), references, False)[0] is False
    assert eval_policy.bar_verdict(pt("policy", 3.0, 0.735), references, False)[0] is False
    assert eval_policy.bar_verdict(pt("policy", 3.0, 0.9), references[:1], False) == (
        False, "no threshold alg_threshold=0.9 among the references")


def test_checkpoints_of_a_policy_folder_and_of_a_run_directory(tmp_path):
    for n in (0, 2, 10):
        os.makedirs(tmp_path / "run" / f"checkpoint-{n}")
    run = str(tmp_path / "run")
    assert [os.path.basename(p) for p in eval_policy.checkpoints(run, "last")] == ["checkpoint-10"]
    assert [os.path.basename(p) for p in eval_policy.checkpoints(run, "first")] == ["checkpoint-0"]
    assert [os.path.basename(p) for p in eval_policy.checkpoints(run, "2,10")] == ["checkpoint-2", "checkpoint-10"]
    folder = os.path.join(REPO, "models", "tiny-policy")
    assert eval_policy.checkpoints(folder, "last") == [folder]


def test_both_modes_through_the_cli_with_verdicts_and_csv(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = str(tmp_path / "eval.csv")
    eval_policy.main(["models/tiny-policy", "--references", "threshold:alg_threshold=0.9", "--seeds", "1,2",
                      "--results_dir", str(tmp_path / "results"), "--out", out, "--", "--limit", "2"])
    printed = capsys.readouterr().out
    assert re.search(r"^BAR block 64: policy models/tiny-policy T=1.0: (NOT )?MET \(on the front: ", printed, re.M)
    assert re.search(r"^BAR block 32: policy models/tiny-policy T=1.0: (NOT )?MET \(accuracy ", printed, re.M)
    rows = list(csv.DictReader(open(out)))
    assert {(r["block_length"], r["configuration"]) for r in rows} == {
        (b, c) for b in ("64", "32") for c in ("threshold alg_threshold=0.9", "policy models/tiny-policy T=1.0")}
    assert {r["n"] for r in rows} == {"2"} and {"accuracy", "avg_steps"} <= {r["metric"] for r in rows}
    assert re.fullmatch(r"tiny-llada-[0-9a-f]{12}", " ".join(os.listdir(tmp_path / "results")))


def test_a_path_without_a_policy_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_policy.main([os.path.join(REPO, "models", "tiny-policy"), str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"no policy folder or checkpoint asked for in {tmp_path}" in capsys.readouterr().err
