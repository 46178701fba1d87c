"""Numbers traceable to their code: run identity, strict inputs, clear failures, rules a decoder
cannot switch off, and a run's numbers from its own samples only."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import custom_demask_eval as cde
from demask import core
from demask import decoders
from demask import tasks
from demask.settings import RunSettings
from conftest import REPO

SMALL = ["--gen_length", "8", "--steps", "8", "--block_length", "8"]


def run_cli(*args, cwd=REPO, script=None, env=None):
    """The command line; a `script` other than the repository's runs against the repository's
    package and data (PYTHONPATH), as an edited copy of the entry script would."""
    script = script or os.path.join(REPO, "custom_demask_eval.py")
    if os.path.dirname(script) != REPO:
        env = dict(env or os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=env)


def only_run(results, label):
    (run,) = sorted((results / label).iterdir())
    return run


def edited_harness(folder, region=None):
    """The entry script alone in `folder`, its editable region replaced (the package and data stay
    the repository's: see run_cli)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = open(os.path.join(REPO, "custom_demask_eval.py")).read()
    if region is not None:
        head, rest = source.split("# --- EDITABLE REGION START ---\n")
        _, tail = rest.split("# --- EDITABLE REGION END ---\n")
        source = head + "# --- EDITABLE REGION START ---\n" + region + "# --- EDITABLE REGION END ---\n" + tail
    (folder / "custom_demask_eval.py").write_text(source)
    return str(folder / "custom_demask_eval.py")


SHIPPED_REGION = os.path.join(REPO, "tests", "fixtures", "shipped_region.py")


def shipped_region():
    """The editable region as it ships (a copy kept for the tests that are about it, so that they do
    not depend on what a researcher pasted into custom_demask_eval.py)."""
    return open(SHIPPED_REGION).read()


def working_region():
    source = open(os.path.join(REPO, "custom_demask_eval.py")).read()
    return source.split("# --- EDITABLE REGION START ---\n")[1].split("# --- EDITABLE REGION END ---\n")[0]


def shipped_decoder_class():
    """DemaskDecoder as the shipped region defines it, in the names the entry script gives it."""
    scope = {name: getattr(cde, name) for name in ("torch", "F", "np", "os", "REPO", "get_num_transfer_tokens",
                                                    "add_gumbel_noise", "choosable")}
    exec(compile(shipped_region(), SHIPPED_REGION, "exec"), scope)
    return scope["DemaskDecoder"]


# ---------------------------------------------------------------------------
# Run identity


def test_fingerprint_in_config_summary_and_directory_name(tmp_path, tiny_llada):
    out = run_cli("--label", "llada-math", "--model_path", tiny_llada, "--limit", "2", *SMALL,
                  "--results_dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    run = only_run(tmp_path, "llada-math")
    summary = json.load(open(run / "summary.json"))
    config = json.load(open(run / "config.json"))
    fp = summary["fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and config["fingerprint"] == fp == summary["config"]["fingerprint"]
    assert re.fullmatch(rf"default-{fp[:8]}-\d{{8}}-\d{{6}}-\d{{6}}", run.name)
    assert config == summary["config"]  # config.json is not changed after it is written
    assert summary["environment"]["git_dirty"] in (True, False, None)


def test_fingerprint_follows_code_and_arguments():
    base = cde.LABELS["tiny-math"].replace(decoder="klass")
    fp = cde.decoder_fingerprint(base)
    assert cde.decoder_fingerprint(base.replace(decoder_args={"kl_threshold": 0.5})) != fp
    assert cde.decoder_fingerprint(base.replace(decoder="default")) != fp
    assert cde.decoder_fingerprint(base.replace(conf_threshold=0.5)) != fp
    assert cde.decoder_fingerprint(base.replace(limit=3)) == fp  # not a decoder argument


def test_edited_region_is_a_new_run_for_sweeps_resume_and_report(tmp_path, tiny_llada):
    results = tmp_path / "results"
    args = ["--label", "llada-math", "--model_path", tiny_llada, "--limit", "2", *SMALL, "--results_dir", str(results)]
    first = edited_harness(tmp_path / "a")
    out = run_cli(*args, "--sweep", "default", script=first)
    assert out.returncode == 0, out.stderr
    (run_a,) = (results / "llada-math").iterdir()

    edited = shipped_region().replace("self.conf_threshold = conf_threshold", "self.conf_threshold = 2.0")
    second = edited_harness(tmp_path / "b", edited)
    out = run_cli(*args, "--sweep", "default", script=second)
    assert out.returncode == 0 and "is complete, skipped" not in out.stderr  # the edit is a new configuration
    assert len(list((results / "llada-math").iterdir())) == 2

    out = run_cli("--resume", str(run_a), script=second)  # the old run cannot be continued by new code
    assert out.returncode == 2 and "fingerprint" in out.stderr and len(out.stderr.strip().splitlines()) == 1

    out = run_cli("report", str(results), script=second)
    assert out.returncode == 0, out.stderr
    board = (results / "report.md").read_text()
    leaderboard = board.split("### Leaderboard (accuracy labels)")[1].split("\n### ")[0]
    rows = [line for line in leaderboard.splitlines() if line.startswith("| default@")]
    assert len(rows) == 2 and len({row.split(" | ")[0] for row in rows}) == 2  # default@<code hash> (date)


@pytest.mark.parametrize("flag", [["--decoder", "klass"], ["--steps", "4"], ["--limit", "1"], ["--label", "tiny-math"]])
def test_resume_refuses_other_settings(tmp_path, tiny_llada, flag):
    out = run_cli("--label", "llada-math", "--model_path", tiny_llada, "--limit", "2", *SMALL,
                  "--results_dir", str(tmp_path))
    run = only_run(tmp_path, "llada-math")
    out = run_cli("--resume", str(run), *flag)
    assert out.returncode == 2 and f"drop {flag[0]}" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_shipped_region_copy_is_the_region_of_this_checkout():
    """The copy the shipped-region tests use is the region that ships; a researcher's edit skips this
    check with one line (in CI, where nothing is edited, a difference is a failure)."""
    if working_region() != shipped_region():
        message = "the editable region was edited; tests about the shipped region use tests/fixtures/shipped_region.py"
        if os.environ.get("CI"):
            pytest.fail(message + ", which must equal the shipped region: update it")
        pytest.skip(message)


def test_default_and_klass_llada_give_identical_generations_and_counts():
    """The editable region ships KLASS: it must not drift from decoders.KlassDecoder (LLaDA variant)."""
    lm = core.load_model(cde.TINY, device="cpu")
    cfg = cde.LABELS["tiny-math"]
    samples = tasks.MathTask().load(cfg)[:16]
    for s in samples:
        s["prompt_ids"] = tasks.encode_prompt(lm, s)
    shipped = shipped_decoder_class()(lm.mask_id, conf_threshold=cfg.conf_threshold, kl_threshold=cfg.kl_threshold,
                                      history_length=cfg.history_length)
    outputs = []
    for decoder in (shipped, decoders.build_decoder("klass", lm.mask_id, cfg, {})):
        outputs.append(core.decode_batch(cfg, lm, decoder, samples, seed=0)[:2])
    assert outputs[0] == outputs[1] and max(outputs[0][1]) < cfg.steps


# ---------------------------------------------------------------------------
# Strict inputs and clear failures


@pytest.mark.parametrize("args,message", [
    (["--limit", "0"], "--limit 0: must be >= 1"), (["--limit", "-1"], "--limit -1"),
    (["--batch_size", "0"], "--batch_size 0"), (["--steps", "0"], "--steps 0"),
    (["--temperature", "-1"], "--temperature -1.0"), (["--top_p", "0"], "--top_p 0.0: must be > 0.0"),
    (["--top_p", "1.5"], "<= 1.0"), (["--conf_threshold", "2"], "--conf_threshold 2.0"),
    (["--kl_threshold", "-0.1"], "--kl_threshold"), (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2 ** 64)], "--seed"), (["--history_length", "0"], "--history_length 0"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
    (["--device", "bogus"], "--device 'bogus'"),
    (["--decoder", "threshold", "--decoder_args", "nope=1"], "no parameter(s) ['nope']"),
    (["--decoder", "klass", "--decoder_args", "variant=gpt"], "klass: unmask_strategy"),
])
def test_bad_values_exit_2_with_one_line_before_loading(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cde.main(["--label", "tiny-math", "--results_dir", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err
    assert not os.listdir(tmp_path)


def test_no_arguments_prints_usage():
    out = run_cli()
    assert out.returncode == 2 and out.stderr.startswith("usage:") and "--label" in out.stderr


def tiny_label(monkeypatch, name, task, data, **extra):
    monkeypatch.setitem(cde.LABELS, name, cde.LABELS["tiny-math"].replace(task=task, data=str(data), **extra))


@pytest.mark.parametrize("content,message", [
    ('{"problem": "1+1", "solution": "2"}\nnot json\n', ":2: not valid JSON"),
    ('{"problem": "1+1"}\n', ":1: missing field(s) ['solution']"),
    ("", "holds no samples"),
])
def test_malformed_data_exit_4_with_line_before_loading(monkeypatch, capsys, tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    tiny_label(monkeypatch, "t", "math", data)
    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cde.main(["--label", "t", "--results_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 4 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_code_problem_without_test_and_duplicate_ids_are_data_errors(monkeypatch, capsys, tmp_path):
    problem = dict(task_id="t/0", prompt="def f():\n", entry_point="f", test="def check(c):\n    pass\n")
    for rows, message in [([{k: v for k, v in problem.items() if k != "test"}], "missing field(s) ['test']"),
                          ([problem, problem], "sample id 't/0' appears twice (records 1 and 2)")]:
        data = tmp_path / "code.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tiny_label(monkeypatch, "c", "humaneval", data)
        with pytest.raises(SystemExit) as exit_info:
            cde.main(["--label", "c", "--results_dir", str(tmp_path / "r")])
        assert exit_info.value.code == 4 and message in capsys.readouterr().err


def test_unreachable_hub_model_is_one_line_exit_4(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = run_cli("--label", "tiny-math", "--model_path", "nobody/no-such-model", "--results_dir", str(tmp_path),
                  env=env)
    assert out.returncode == 4 and "cannot load model 'nobody/no-such-model'" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "tiny-math").exists()  # refused before any folder
    out = run_cli("--label", "tiny-math", "--model_path", "nobody/no-such-model", "--results_dir", str(tmp_path),
                  "--debug", env=env)
    assert out.returncode != 0 and "Traceback" in out.stderr


class Stuck(decoders.TopKDecoder):
    """Calls the model forever without committing anything."""

    def decode(self, model, input_ids, gen_length, steps, block_length):
        x = F.pad(input_ids.to(model.device), (0, gen_length), value=self.mask_id)
        while True:
            model(x)


class Returns(decoders.TopKDecoder):
    def __init__(self, mask_id, what="none"):
        super().__init__(mask_id)
        self.what = what

    def decode(self, model, input_ids, gen_length, steps, block_length):
        x, steps = super().decode(model, input_ids, gen_length, steps, block_length)
        return {"none": None, "x": x, "float": (x.float(), steps), "meta": (x.to("meta"), steps),
                "steps": (x, "16"), "nan": (torch.full(x.shape, float("nan")), steps)}[self.what]


@pytest.mark.parametrize("cls,args,message", [
    (Stuck, {}, "no token committed or re-masked in 16 consecutive forwards"),
    (Returns, {"what": "none"}, "rule 'decoder returns (x, used_steps)' broken for sample math_test/"),
    (Returns, {"what": "x"}, "got Tensor"),
    (Returns, {"what": "float"}, "token ids must be integers, got dtype torch.float32"),
    (Returns, {"what": "nan"}, "token ids must be integers"),
    (Returns, {"what": "meta"}, "x is a tensor on meta"),
    (Returns, {"what": "steps"}, "used_steps is str"),
])
def test_broken_decoders_stop_with_one_line_exit_3(monkeypatch, capsys, tmp_path, tiny_llada, cls, args, message):
    monkeypatch.setitem(decoders.DECODERS, "broken", decoders.MethodInfo(cls, args))
    with pytest.raises(SystemExit) as exit_info:
        cde.main(["--label", "llada-math", "--model_path", tiny_llada, "--limit", "2", "--decoder", "broken", *SMALL,
                  "--results_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 3 and message in err[-1] and not err[-1].startswith("Traceback")


class FailsOnThirdBatch(decoders.TopKDecoder):
    calls = 0

    def decode(self, model, input_ids, gen_length, steps, block_length):
        x, steps = super().decode(model, input_ids, gen_length, steps, block_length)
        FailsOnThirdBatch.calls += 1
        if FailsOnThirdBatch.calls == 3:
            x[:, 0] += 1
        return x, steps


def test_rule_violation_keeps_finished_samples(monkeypatch, capsys, tmp_path, tiny_llada):
    monkeypatch.setitem(decoders.DECODERS, "late", decoders.MethodInfo(FailsOnThirdBatch, {}))
    with pytest.raises(SystemExit) as exit_info:
        cde.main(["--label", "llada-math", "--model_path", tiny_llada, "--limit", "40", "--batch_size", "4",
                  "--decoder", "late", *SMALL, "--results_dir", str(tmp_path)])
    assert exit_info.value.code == 3 and "rule 'prompt unchanged'" in capsys.readouterr().err
    records = [json.loads(line) for line in open(only_run(tmp_path, "llada-math") / "samples.jsonl")]
    assert len(records) == 8


def test_ctrl_c_keeps_samples_and_exits_130(tmp_path, tiny_llada):
    cmd = [sys.executable, os.path.join(REPO, "custom_demask_eval.py"), "--label", "llada-math", "--decoder", "klass",
           "--model_path", tiny_llada, "--limit", "500", "--batch_size", "1", "--gen_length", "64", "--steps", "64",
           "--block_length", "64", "--results_dir", str(tmp_path)]
    # Ctrl-C reaches a run in the terminal's foreground; a shell's background job (a CI started with
    # `&`) hands its children SIGINT ignored, so the child gets the foreground's default back
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.stat().st_size for p in tmp_path.glob("llada-math/*/samples.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # 500 samples of 64 forwards take minutes: the run is mid-way
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted")
    run = only_run(tmp_path, "llada-math")
    assert all(json.loads(line)["id"] for line in open(run / "samples.jsonl"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_dir_is_one_line_exit_5(tmp_path, tiny_llada):
    tmp_path.chmod(0o500)
    out = run_cli("--label", "llada-math", "--model_path", tiny_llada, "--limit", "2", *SMALL,
                  "--results_dir", str(tmp_path / "r"))
    tmp_path.chmod(0o700)
    assert out.returncode == 5 and "cannot write results" in out.stderr and "Traceback" not in out.stderr


def test_full_disk_is_one_line_exit_5(monkeypatch, capsys, tmp_path, tiny_llada):
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cde.os, "fsync", full)
    with pytest.raises(SystemExit) as exit_info:
        cde.main(["--label", "llada-math", "--model_path", tiny_llada, "--limit", "2", *SMALL,
                  "--results_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 5 and err[-1] == "error: cannot write results: [Errno 28] No space left on device"


def test_cpu_threads_default_to_one_and_follow_the_flag(tmp_path, tiny_llada):
    for extra, threads in (([], 1), (["--threads", "2"], 2)):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        out = run_cli("--label", "llada-math", "--model_path", tiny_llada, "--limit", "1", *SMALL, *extra,
                      "--results_dir", str(tmp_path / str(threads)), env=env)
        assert out.returncode == 0, out.stderr
        summary = json.load(open(next((tmp_path / str(threads) / "llada-math").iterdir()) / "summary.json"))
        assert summary["environment"]["threads"] == threads


# ---------------------------------------------------------------------------
# A run's numbers come from its own samples only


def finished_run(tmp_path, tiny_llada, limit=4):
    out = run_cli("--label", "llada-math", "--model_path", tiny_llada, "--limit", str(limit), *SMALL,
                  "--results_dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    run = only_run(tmp_path, "llada-math")
    os.remove(run / "summary.json")
    return run


@pytest.mark.parametrize("change,message", [
    (lambda lines: lines + [json.dumps(dict(json.loads(lines[0]), id="llada_math/99")) + "\n"],
     ":5: sample id 'llada_math/99' is not in this run's sample set"),
    (lambda lines: lines + [lines[0]], "appears twice"),
    (lambda lines: lines[:1] + ["garbage\n"] + lines[1:], "samples.jsonl:2: not a sample record"),
    (lambda lines: lines[:1] + ['{"no": "id"}\n'] + lines[1:], "samples.jsonl:2: not a sample record"),
])
def test_resume_rejects_foreign_repeated_and_garbage_lines(tmp_path, tiny_llada, change, message):
    run = finished_run(tmp_path, tiny_llada)
    lines = open(run / "samples.jsonl").readlines()
    (run / "samples.jsonl").write_text("".join(change(lines)))
    out = run_cli("--resume", str(run))
    assert out.returncode == 4 and message in out.stderr and "Traceback" not in out.stderr


def test_sweep_with_another_limit_is_another_run(tmp_path, tiny_llada):
    args = ["--label", "llada-math", "--model_path", tiny_llada, *SMALL, "--results_dir", str(tmp_path),
            "--sweep", "confidence_greedy"]
    assert run_cli(*args, "--limit", "4").returncode == 0
    out = run_cli(*args, "--limit", "2")
    assert out.returncode == 0 and "n_samples=2.0000" in out.stdout
    assert len(list((tmp_path / "llada-math").iterdir())) == 2


# ---------------------------------------------------------------------------
# Counting and checks a decoder cannot switch off


class Bypass(decoders.TopKDecoder):
    def __init__(self, mask_id, how="nfe"):
        super().__init__(mask_id)
        self.how = how

    def decode(self, model, input_ids, gen_length, steps, block_length):
        if self.how == "nfe":
            model.nfe.zero_()
        if self.how == "observer":
            model.observer = None
        if self.how == "forward":
            model.forward(input_ids)
        if self.how == "wide":  # fills the second block first, hiding it behind an extra column
            x = F.pad(input_ids.to(model.device), (0, gen_length), value=self.mask_id)
            model(F.pad(x, (0, 1), value=self.mask_id))
            x[:, -block_length:] = 7
            model(F.pad(x, (0, 1), value=self.mask_id))
        return super().decode(model, input_ids, gen_length, steps, block_length)


@pytest.mark.parametrize("how,match", [("nfe", "AttributeError"), ("observer", "AttributeError"),
                                       ("forward", "AttributeError"), ("wide", "forward shape")])
def test_decoder_cannot_bypass_counting_or_checks(tiny_llada, how, match):
    lm = core.load_model(tiny_llada, device="cpu")
    cfg = RunSettings(gen_length=8, steps=8, block_length=4)
    with pytest.raises(core.RuleViolation, match=match):  # a decoder's exception is a DecoderError
        core.decode_batch(cfg, lm, Bypass(lm.mask_id, how), [dict(id="s/0", prompt_ids=[0, 5, 6])], seed=0)


class Guided(decoders.TopKDecoder):
    """Classifier-free-guidance style: each forward sees the batch and an un-prompted copy (2B rows)."""

    def decode(self, model, input_ids, gen_length, steps, block_length):
        P = input_ids.shape[1]
        x = F.pad(input_ids.to(model.device), (0, gen_length), value=self.mask_id)
        for _ in range(gen_length):
            unprompted = x.clone()
            unprompted[:, :P] = self.mask_id
            model(torch.cat([x, unprompted]))
            first = (x == self.mask_id).float().argmax(1)
            x[torch.arange(len(x)), first] = 7
        return x, gen_length


def test_guidance_rows_are_counted_and_checked(tiny_llada):
    lm = core.load_model(tiny_llada, device="cpu")
    cfg = RunSettings(gen_length=4, steps=4, block_length=4)
    batch = [dict(id="s/0", prompt_ids=[0, 5, 6]), dict(id="s/1", prompt_ids=[0, 9])]
    decoder = Guided(lm.mask_id)
    decoder.batched = True
    _, counted, reported = core.decode_batch(cfg, lm, decoder, batch, seed=0)
    assert counted == [8, 8] and reported == [4, 4]  # 4 calls of 2B rows: 2 forwards per sample each


# A decoder written for the original harness: LLaDA generate.py's loop, batch 1 (tests/fixtures).
ORIGINAL_HARNESS_DECODER = open(os.path.join(REPO, "tests", "fixtures", "original_harness_decoder.py")).read()


@pytest.mark.parametrize("label", ["tiny-math", "tiny-code", "tiny-text"])
def test_batch_one_decoder_runs_on_every_tiny_label_with_its_default_batch(tmp_path, label):
    script = edited_harness(tmp_path / "harness", ORIGINAL_HARNESS_DECODER)
    out = run_cli("--label", label, "--limit", "20", "--results_dir", str(tmp_path / "r"), script=script)
    assert out.returncode == 0, out.stderr[-2000:]
    gen = cde.LABELS[label].gen_length
    assert f"avg_steps_{label}: {gen}.0000" in out.stdout and f"n_samples_{label}: 20.0000" in out.stdout
    summary = json.load(open(only_run(tmp_path / "r", label) / "summary.json"))
    assert summary["config"]["batch_size"] == 16 and summary["config"]["decoder_info"]["batched"] is False
