"""The harness end to end: schedule, CLI, result files, counting, rule checks, resume."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import custom_demask_eval as cde
from demask import core
from demask import decoders
from demask.settings import RunSettings
from conftest import REPO

SMALL = ["--gen_length", "16", "--steps", "16", "--block_length", "8"]


def test_schedule_edge_cases():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :10], mask[1, :7], mask[2, :3] = True, True, True
    k = decoders.get_num_transfer_tokens(mask, 4)
    assert k.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [1, 1, 1, 0]]
    assert k.dtype == torch.long and k.shape == (3, 4)
    many = decoders.get_num_transfer_tokens(mask[2:], 8)  # more steps than tokens
    assert many.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    assert decoders.get_num_transfer_tokens(torch.ones(1, 64, dtype=torch.bool), 64).tolist() == [[1] * 64]


def run_cli(tmp_path, *args):
    out = subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), "--results_dir",
                          str(tmp_path), *args], capture_output=True, text=True, timeout=600)
    return out


def run_dirs(tmp_path, label):
    return sorted((tmp_path / label).iterdir())


@pytest.mark.parametrize("label,metric", [("llada-math", "accuracy"), ("llada-humaneval", "pass@1")])
def test_cli_end_to_end(tmp_path, tiny_llada, label, metric):
    out = run_cli(tmp_path, "--label", label, "--model_path", tiny_llada, "--limit", "10", "--batch_size", "4", *SMALL)
    assert out.returncode == 0, out.stderr
    task = "math" if "math" in label else "humaneval"
    short = "acc" if task == "math" else "pass@1"
    assert re.search(rf"^TRAIN_METRICS: {task} 10/10 {re.escape(short)}=\d\.\d{{3}} avg_steps=16\.0$", out.stdout, re.M)
    assert re.search(rf"^{re.escape(metric)}_{label}: \d\.\d{{4}}$", out.stdout, re.M)
    assert f"avg_steps_{label}: 16.0000" in out.stdout and f"n_samples_{label}: 10.0000" in out.stdout
    (run,) = run_dirs(tmp_path, label)
    assert run.name.startswith("default-")
    records = [json.loads(l) for l in open(run / "samples.jsonl")]
    assert len(records) == 10 and len({r["id"] for r in records}) == 10
    for key in ("id", "prompt", "generation", "correct", "steps", "reported_steps", "seconds", "seed"):
        assert all(key in r for r in records)
    summary = json.load(open(run / "summary.json"))
    assert summary["config"]["model"] == tiny_llada and summary["config"]["block_length"] == 8
    assert summary["metrics"]["n_samples"] == 10 and summary["environment"]["torch"] == torch.__version__
    assert summary["deviations_from_klass"]


def test_dream_end_to_end(tmp_path, tiny_dream):
    out = run_cli(tmp_path, "--label", "dream-math", "--model_path", tiny_dream, "--limit", "3", "--decoder", "klass",
                  "--gen_length", "16", "--steps", "16", "--block_length", "16")
    assert out.returncode == 0, out.stderr
    assert "TRAIN_METRICS: math 3/3" in out.stdout and "n_samples_dream-math: 3.0000" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--label", "nope"], "unknown label 'nope'"),
    (["--label", "llada-math", "--gen_length", "100", "--block_length", "64"], "not divisible by block_length"),
    (["--label", "llada-math", "--steps", "102"], "not divisible by the number of blocks 4"),
    (["--label", "llada-math", "--model_path", "/no/such/model"], "model path '/no/such/model' not found"),
    (["--label", "llada-math", "--decoder", "nope"], "unknown decoder 'nope'"),
    (["--label", "llada-math", "--decoder", "klass", "--decoder_args", "bogus=1"], "no parameter(s) ['bogus']"),
])
def test_bad_cli_exits_2_before_loading(monkeypatch, capsys, args, message):
    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cde.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


class DoubleCallDecoder(decoders.TopKDecoder):
    """Calls the model twice per step and reports only one step per step."""

    def decode(self, model, input_ids, gen_length, steps, block_length):
        real_call = model.__call__
        calls = []

        class Twice:
            def __getattr__(self, name):
                return getattr(model, name)

            def __call__(self, x, **kw):
                calls.append(1)
                real_call(x, **kw)
                return real_call(x, **kw)
        x, _ = super().decode(Twice(), input_ids, gen_length, steps, block_length)
        return x, len(calls)


def test_counted_steps_do_not_trust_the_decoder(tmp_path, tiny_llada, monkeypatch, capsys):
    monkeypatch.setitem(decoders.DECODERS, "double", decoders.MethodInfo(DoubleCallDecoder, {}))
    metrics = cde.main(["--label", "llada-math", "--model_path", tiny_llada, "--limit", "3", "--decoder", "double",
                        "--results_dir", str(tmp_path), *SMALL])
    assert metrics["avg_steps"] == 32.0
    (run,) = run_dirs(tmp_path, "llada-math")
    records = [json.loads(l) for l in open(run / "samples.jsonl")]
    assert {r["steps"] for r in records} == {32} and {r["reported_steps"] for r in records} == {16}
    assert "decoder reported 16 steps but 32 forwards were counted" in capsys.readouterr().err


class Misbehaving(decoders.TopKDecoder):
    def __init__(self, mask_id, how):
        super().__init__(mask_id)
        self.how = how

    def decode(self, model, input_ids, gen_length, steps, block_length):
        P = input_ids.shape[1]
        x = F.pad(input_ids.to(model.device), (0, gen_length), value=self.mask_id)
        model(x)
        if self.how == "shape":
            return x[:, :-1], 1
        if self.how == "prompt":
            x[:, 0] = 7
        if self.how == "order":  # the second block before the first
            x[:, P + block_length] = 7
        if self.how == "masks left":
            x[:, P:P + block_length] = 7
        if self.how == "rewrite":
            x[:, P:P + block_length] = 7
            model(x)
            x[:, P] = 8
        return x, 1


@pytest.mark.parametrize("how,rule", [("shape", "output shape"), ("prompt", "prompt unchanged"),
                                      ("order", "blocks in order"), ("masks left", "no mask left"),
                                      ("rewrite", "committed tokens are final")])
def test_rule_breaks_name_rule_and_sample(tiny_llada, how, rule):
    model = core.load_model(tiny_llada, device="cpu")
    batch = [dict(id="s/0", prompt_ids=[0, 5, 6]), dict(id="s/1", prompt_ids=[0, 9])]
    cfg = RunSettings(gen_length=8, steps=8, block_length=4)
    with pytest.raises(core.RuleViolation, match=rf"rule '{rule}' broken for sample s/\d"):
        core.decode_batch(cfg, model, Misbehaving(model.mask_id, how), batch, seed=0)


def test_remasking_allowed_only_when_declared(tiny_llada):
    model = core.load_model(tiny_llada, device="cpu")
    decoder = Misbehaving(model.mask_id, "rewrite")
    decoder.remasks = True
    batch = [dict(id="s/0", prompt_ids=[0, 5, 6])]
    gens, counted, _ = core.decode_batch(RunSettings(gen_length=8, steps=8, block_length=8), model, decoder, batch, seed=0)
    assert counted == [2] and gens[0][0] == 8


@pytest.mark.parametrize("decoder", ["default", "confidence_greedy", "topk_margin", "klass"])
def test_batch_invariance_fp32(tiny_llada, decoder):
    """Greedy generations and per-row step counts are the same alone and in a left-padded batch."""
    model = core.load_model(tiny_llada, device="cpu")
    samples = [dict(id=f"s/{i}", prompt_ids=p) for i, p in enumerate([[0, 5, 6, 7, 8, 9], [0, 11], [0, 12, 13, 14]])]
    cfg = RunSettings(gen_length=16, steps=8, block_length=8, temperature=0.0, conf_threshold=0.3, kl_threshold=0.5,
               history_length=2)
    dec = decoders.build_decoder(decoder, model.mask_id, cfg, {})
    alone = [core.decode_batch(cfg, model, dec, [s], seed=0) for s in samples]
    gens, counted, _ = core.decode_batch(cfg, model, dec, samples, seed=0)
    assert gens == [a[0][0] for a in alone]
    assert counted == [a[1][0] for a in alone]


def test_resume_after_interruption_gives_same_summary(tmp_path, tiny_llada):
    args = ["--label", "llada-math", "--model_path", tiny_llada, "--limit", "6", "--batch_size", "2", *SMALL]
    full = cde.main([*args, "--results_dir", str(tmp_path / "a")])
    (run,) = run_dirs(tmp_path / "a", "llada-math")
    lines = open(run / "samples.jsonl").read().splitlines(keepends=True)
    with open(run / "samples.jsonl", "w") as f:  # two finished samples and a line cut by a crash
        f.writelines(lines[:2] + [lines[2][:25]])
    os.remove(run / "summary.json")
    resumed = cde.main(["--resume", str(run)])
    assert resumed == full
    records = [json.loads(l) for l in open(run / "samples.jsonl")]
    assert sorted(r["id"] for r in records) == sorted(json.loads(l)["id"] for l in lines)
    assert json.load(open(run / "summary.json"))["metrics"] == full


def test_text_label_end_to_end(tmp_path, tiny_dream):
    out = run_cli(tmp_path, "--label", "dream-text", "--decoder", "klass", "--model_path", tiny_dream, "--limit", "10",
                  "--batch_size", "5",
                  "--gen_length", "16", "--steps", "32", "--block_length", "16", "--scorer", "smollm2-135m")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^TRAIN_METRICS: text 10/10 avg_steps=16\.0 rep2=\d\.\d{3}$", out.stdout, re.M)
    for name in ("gen_ppl", "mauve", "entropy", "rep2", "avg_steps", "n_samples"):
        assert re.search(rf"^{name}_dream-text: \d+\.\d{{4}}$", out.stdout, re.M), name
    (run,) = run_dirs(tmp_path, "dream-text")
    summary = json.load(open(run / "summary.json"))
    assert summary["details"]["scorer"] == "smollm2-135m" and len(summary["details"]["mauve_per_seed"]) == 5
    records = [json.loads(l) for l in open(run / "samples.jsonl")]
    assert all(r["prompt"] and "reference" in r for r in records)


def test_script_wrapper_honours_model_path_and_limit(tmp_path, tiny_llada):
    env = dict(os.environ, MODEL_PATH=tiny_llada, LIMIT="2")
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "llada_math.sh"), "--results_dir", str(tmp_path),
                          *SMALL], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "n_samples_llada-math: 2.0000" in out.stdout
