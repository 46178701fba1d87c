"""Verdicts are re-derived, never read back (issue #24 item 5): each test reproduces a hole an
adversarial review found (a run directory's files edited by hand) and checks that the harness now
refuses it or corrects it, while honest runs are judged as before."""
import json
import os
import shutil

import pytest

import custom_demask_eval as cde
from conftest import REPO
from test_trust import run_cli


def make_run(folder, label):
    """A finished bundled tiny-model run of 4 samples: its run directory and stdout."""
    out = run_cli("--label", label, "--limit", "4", "--results_dir", str(folder))
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (folder / label).iterdir()
    return run, out.stdout


@pytest.fixture(scope="module")
def math_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("math"), "tiny-math")


@pytest.fixture(scope="module")
def code_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("code"), "tiny-code")


def copy_run(run, where):
    shutil.copytree(run, where)
    return where


def records(run):
    return [json.loads(line) for line in open(run / "samples.jsonl")]


def write_records(run, rows):
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def final_lines(stdout, label):
    return [line for line in stdout.splitlines() if line.split(":")[0].endswith(f"_{label}")]


# ---------------------------------------------------------------------------
# --resume: the records of earlier attempts


@pytest.mark.parametrize("which", ["math", "code"])
def test_edited_verdict_then_resume_exits_4_naming_the_id(request, tmp_path, which):
    (run, _), label = request.getfixturevalue(f"{which}_run"), f"tiny-{which}"
    run = copy_run(run, tmp_path / "run")
    rows = records(run)
    wrong = [r["id"] for r in rows if not r["correct"]]
    assert wrong, "the tiny run got every sample right: nothing to flip"
    write_records(run, [dict(r, correct=True) for r in rows])
    out = run_cli("--resume", str(run))
    assert out.returncode == 4 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert f"sample {wrong[0]!r}: its stored correct True" in out.stderr and "--rejudge" in out.stderr
    assert final_lines(out.stdout, label) == []  # no accuracy printed


def test_rejudge_corrects_the_records_and_gives_the_honest_accuracy(math_run, tmp_path):
    run, honest_stdout = math_run
    run = copy_run(run, tmp_path / "run")
    honest = records(run)
    wrong = [r["id"] for r in honest if not r["correct"]]
    write_records(run, [dict(r, correct=True) for r in honest])
    out = run_cli("--resume", str(run), "--rejudge")
    assert out.returncode == 0, out.stderr[-2000:]
    corrected = [line for line in out.stderr.splitlines() if line.startswith("rejudged: ")]
    assert len(corrected) == len(wrong) and all(f"sample {i!r}: correct True -> False" in out.stderr for i in wrong)
    assert final_lines(out.stdout, "tiny-math") == final_lines(honest_stdout, "tiny-math")
    assert [r["correct"] for r in records(run)] == [r["correct"] for r in honest]
    assert json.load(open(run / "summary.json"))["metrics"]["accuracy"] == (len(honest) - len(wrong)) / len(honest)


@pytest.mark.parametrize("field,value,message", [
    ("steps", -100, "steps -100 is not a count of forwards"),
    ("steps", "x", "steps 'x' is not a count of forwards"),
    ("steps", 1.5, "steps 1.5 is not a count of forwards"),
    ("steps", True, "steps True is not a count of forwards"),
    ("steps", 257, "steps 257 is not a count of forwards (an integer from 0 to 256"),  # 4 x max(64, 64)
    ("reported_steps", "x", "reported_steps 'x' is not an integer"),
    ("generation", None, "generation None is not a string"),
    ("id", ["a"], "samples.jsonl:1: not a sample record"),
])
def test_bad_record_values_exit_4_with_one_line(math_run, tmp_path, field, value, message):
    run = copy_run(math_run[0], tmp_path / "run")
    rows = records(run)
    rows[0][field] = value
    write_records(run, rows)
    out = run_cli("--resume", str(run))
    assert out.returncode == 4 and "Traceback" not in out.stderr, out.stderr[-2000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and message in error[0], out.stderr[-2000:]
    if field != "id":
        assert f"samples.jsonl: sample {rows[0]['id']!r}" in error[0]


# ---------------------------------------------------------------------------
# Sweeps and seeds: a configuration found complete


def test_complete_sweep_configuration_is_rederived_not_read(tmp_path, monkeypatch, capsys):
    args = ["--label", "tiny-math", "--limit", "4", "--results_dir", str(tmp_path), "--seeds", "1,2"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    honest = json.load(open(next((tmp_path / "tiny-math").glob("*-seeds")) / "seeds_summary.json"))["metrics"]
    runs = sorted(p for p in (tmp_path / "tiny-math").iterdir() if not p.name.endswith("-seeds"))
    summary = json.load(open(runs[0] / "summary.json"))
    summary["metrics"].update(accuracy=1.0, avg_steps=1.0)
    json.dump(summary, open(runs[0] / "summary.json", "w"))

    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    stats = cde.main(args)
    out = capsys.readouterr()
    assert stats == [honest]  # the seeds' mean ± std from their samples, not from the edited summary
    assert out.err.count("is complete, skipped") == 2 and f"{runs[0]}/summary.json: accuracy 1.0 in summary.json" in out.err
    assert f"accuracy_tiny-math: {honest['accuracy']['mean']:.4f} ± {honest['accuracy']['std']:.4f}" in out.out

    # --rejudge puts the re-derived metrics back into summary.json
    cde.main(args + ["--rejudge"])
    rows = records(runs[0])
    assert json.load(open(runs[0] / "summary.json"))["metrics"]["accuracy"] == sum(r["correct"] for r in rows) / len(rows)
    capsys.readouterr()
    assert cde.main(args) == [honest]
    assert "in summary.json" not in capsys.readouterr().err

    # an edited verdict in a complete configuration stops the sweep (exit 4), before any model loads
    rows = records(runs[1])
    write_records(runs[1], [dict(r, correct=not r["correct"]) for r in rows])
    with pytest.raises(SystemExit) as exit_info:
        cde.main(args)
    assert exit_info.value.code == 4 and f"sample {rows[0]['id']!r}" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The report


def test_report_lists_edited_and_sampleless_runs_as_problems(math_run, tmp_path):
    results = tmp_path / "results"
    honest = copy_run(math_run[0], results / "tiny-math" / "honest")
    summary_edited = copy_run(math_run[0], results / "tiny-math" / "summary-edited")
    summary = json.load(open(summary_edited / "summary.json"))
    summary["metrics"]["accuracy"] = 1.0
    json.dump(summary, open(summary_edited / "summary.json", "w"))
    samples_edited = copy_run(math_run[0], results / "tiny-math" / "samples-edited")
    rows = records(samples_edited)
    write_records(samples_edited, [dict(r, correct=True) for r in rows])
    steps_edited = copy_run(math_run[0], results / "tiny-math" / "steps-edited")
    write_records(steps_edited, [dict(r, steps=-100) for r in records(steps_edited)])
    os.remove(copy_run(math_run[0], results / "tiny-math" / "no-samples") / "samples.jsonl")

    out = run_cli("report", str(results))
    assert out.returncode == 0, out.stderr[-2000:]
    md = (results / "report.md").read_text()
    assert "1 runs read" in md
    problems = md.split("Runs not shown", 1)[1].split("\n\n", 1)[0]
    accuracy = json.load(open(honest / "summary.json"))["metrics"]["accuracy"]
    assert "tiny-math/summary-edited/summary.json: ValueError: summary.json's metrics are not those of its samples: " \
           f"accuracy 1.0 in summary.json, {accuracy:.6g} from samples.jsonl" in problems
    wrong = next(r["id"] for r in rows if not r["correct"])
    assert f"tiny-math/samples-edited/summary.json: InputError: tiny-math/samples-edited/samples.jsonl: sample {wrong!r}" \
           in problems
    assert "tiny-math/steps-edited/summary.json: InputError: " in problems and "steps -100" in problems
    assert "tiny-math/no-samples/summary.json: InputError: no samples.jsonl" in problems
    assert f"| {100 * accuracy:.1f} |" in md.split("### Leaderboard (accuracy labels)")[1]
    assert "gen_ppl, MAUVE and entropy of text runs" in md  # what is not re-derived, said in the header


# ---------------------------------------------------------------------------
# The code verdict cache


def test_code_verdict_cache_spares_the_sandbox_and_cannot_change_a_verdict(code_run, tmp_path, monkeypatch):
    import utils
    from demask import records as records_module
    from demask import verdicts
    from demask.tasks import TASKS
    monkeypatch.setenv("DEMASK_CACHE", str(tmp_path / "cache"))
    run_dir = copy_run(code_run[0], tmp_path / "run")
    run = verdicts.settings_from_config(json.load(open(run_dir / "config.json")))
    task = TASKS[run.task]()
    samples = task.load(run)[:run.limit]
    judged, real = [], utils.check_code

    def counting(problems, completions, **kwargs):
        judged.extend(completions)
        return real(problems, completions, **kwargs)
    monkeypatch.setattr(utils, "check_code", counting)

    honest = records(run_dir)
    assert verdicts.read_checked(str(run_dir), run, task, samples) == honest
    assert sorted(judged) == sorted(r["id"] for r in honest)  # the first re-judge runs every program
    cache_file = tmp_path / "cache" / "verdicts" / "code.json"
    assert len(json.load(open(cache_file))) == len(honest)
    judged.clear()
    assert verdicts.read_checked(str(run_dir), run, task, samples) == honest
    assert judged == []  # the second: none

    # a planted entry that flips a verdict: the sandbox runs that program again and decides
    entries = json.load(open(cache_file))
    key = verdicts.code_key(task.problems[honest[0]["id"]], honest[0]["completion"])
    entries[key] = [not honest[0]["correct"], "passed" if not honest[0]["correct"] else "failed: planted"]
    json.dump(entries, open(cache_file, "w"))
    assert verdicts.read_checked(str(run_dir), run, task, samples, rejudge=True) == honest
    assert judged == [honest[0]["id"]] and records(run_dir) == honest  # no correction made from the cache
    assert json.load(open(cache_file))[key] == [honest[0]["correct"], honest[0]["result"]]

    # a record edited to agree with a planted entry is what the cache cannot catch (see verdicts'
    # docstring: it trusts this machine's cache folder); an edit alone is caught
    judged.clear()
    flipped = [dict(r, correct=not r["correct"]) if i == 0 else r for i, r in enumerate(honest)]
    write_records(run_dir, flipped)
    with pytest.raises(records_module.InputError, match=f"sample {honest[0]['id']!r}: its stored correct"):
        verdicts.read_checked(str(run_dir), run, task, samples)
    assert judged == [honest[0]["id"]]
