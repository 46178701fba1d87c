"""Numbers that cannot be gamed by the decoder: each test reproduces a hole an adversarial review
found (a decoder that cheats from inside the process) and checks that the harness now refuses it,
while honest decoders are judged as before."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import custom_demask_eval as cde
from demask import core, decoders, tasks, trajectories
from demask.settings import RunSettings
from conftest import REPO
from test_trust import edited_harness, run_cli

SMALL = RunSettings(gen_length=8, steps=8, block_length=4)
ONE_BLOCK = RunSettings(gen_length=8, steps=8, block_length=8)
SAMPLE = [dict(id="s/0", prompt_ids=[0, 5, 6], question="What is 6 * 7?", solution="\\boxed{42}")]


@pytest.fixture(scope="module")
def lm():
    return core.load_model(cde.TINY, device="cpu")


def decode(lm, decoder, run=SMALL, batch=SAMPLE):
    return core.decode_batch(run, lm, decoder, batch, seed=0)


class Liar(torch.Tensor):
    """Answers every comparison with all-False: checks that compare would see no masks, no change
    and no out-of-order commit."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func in (torch.Tensor.__eq__, torch.Tensor.__ne__, torch.eq, torch.ne, torch.Tensor.eq, torch.Tensor.ne):
            return torch.zeros(out.shape, dtype=torch.bool)
        return out


class Scripted(decoders.BlockDecoder):
    """A decoder that does what `plan` says: a list of ("forward" | "fill" | "fill_later" | ...)."""

    def __init__(self, mask_id, plan=()):
        super().__init__(mask_id)
        self.plan = plan

    def decode(self, model, input_ids, gen_length, steps, block_length):
        P = input_ids.shape[1]
        x = F.pad(input_ids.to(model.device), (0, gen_length), value=self.mask_id)
        for action in self.plan:
            if action == "forward":
                model(x)
            elif action == "liar_forward":
                model(x.as_subclass(Liar))
            elif action == "fill":
                x[:, P:] = 7
            elif action == "fill_later":
                x[:, P + block_length:] = 7
            elif action == "liar":
                x = x.as_subclass(Liar)
            elif action == "edit_input":
                input_ids[:, -1] = 9
                x[:, :P] = input_ids
        return x, 1


@pytest.mark.parametrize("plan,rule", [
    (["liar_forward", "fill"], "forward input"),               # a subclass handed to the model
    (["forward", "fill", "liar"], "decoder returns"),         # a subclass returned
    (["liar"], "decoder returns"),                            # zero forwards, masks hidden by a subclass
    (["fill"], "no forward"),                                  # the answer written without the model
    (["fill_later", "forward", "fill"], "blocks in order"),   # a later block before the first forward
    (["forward", "edit_input", "fill"], "prompt unchanged"),  # input_ids edited in place (CPU aliasing)
])
def test_rules_cannot_be_dodged(lm, plan, rule):
    with pytest.raises(core.RuleViolation, match=rule):
        decode(lm, Scripted(lm.mask_id, plan))


def test_an_instance_attribute_cannot_answer_a_check(lm):
    class Patched(Scripted):
        def decode(self, model, input_ids, gen_length, steps, block_length):
            x, n = super().decode(model, input_ids, gen_length, steps, block_length)
            x[:, -1] = self.mask_id                       # a mask left ...
            x.eq = lambda *a, **k: torch.zeros_like(x, dtype=torch.bool)   # ... hidden by the instance
            x.__dict__["view"] = lambda *a: x
            return x, n
    with pytest.raises(core.RuleViolation, match="no mask left"):
        decode(lm, Patched(lm.mask_id, ["forward", "fill"]), ONE_BLOCK)


def test_a_caught_violation_stays_broken(lm):
    class Swallow(Scripted):
        def decode(self, model, input_ids, gen_length, steps, block_length):
            x = F.pad(input_ids, (0, gen_length), value=self.mask_id)
            try:
                model(x.as_subclass(Liar))
            except core.RuleViolation:
                pass
            model(x)
            x[:, input_ids.shape[1]:] = 7
            return x, 2
    with pytest.raises(core.RuleViolation, match="forward input"):
        decode(lm, Swallow(lm.mask_id))


class Flipper(decoders.BlockDecoder):
    """Re-masks and re-writes one position forever: x changes at every forward, nothing progresses."""
    remasks = True

    def decode(self, model, input_ids, gen_length, steps, block_length):
        x = F.pad(input_ids, (0, gen_length), value=self.mask_id)
        P = input_ids.shape[1]
        while True:
            model(x)
            x[:, P] = 7 if int(x[0, P]) == self.mask_id else self.mask_id


def test_remasking_without_progress_hits_the_forward_budget(lm):
    with pytest.raises(core.RuleViolation, match=r"forward budget.*32 forwards"):
        decode(lm, Flipper(lm.mask_id))


def test_query_idx_out_of_range_is_a_rule_not_a_crash(lm):
    class Wild(Scripted):
        def decode(self, model, input_ids, gen_length, steps, block_length):
            x = F.pad(input_ids, (0, gen_length), value=self.mask_id)
            model(x, query_idx=torch.tensor([[x.shape[1] + 5]]))
            return x, 1
    with pytest.raises(core.RuleViolation, match="query_idx"):
        decode(lm, Wild(lm.mask_id))


def test_decoder_exception_names_sample_and_type(lm):
    class Crash(Scripted):
        def decode(self, model, input_ids, gen_length, steps, block_length):
            raise KeyError("boom")
    with pytest.raises(core.DecoderError, match=r"decoder raised KeyError on sample s/0"):
        decode(lm, Crash(lm.mask_id))


CRASHING_REGION = '''
class DemaskDecoder:
    def __init__(self, mask_id, temperature=0.0, conf_threshold=0.9, kl_threshold=0.01, history_length=2):
        self.mask_id = mask_id

    def decode(self, model, input_ids, gen_length, steps, block_length):
        guidance = torch.full_like(input_ids, -1)
        return model(guidance).logits, 0
'''


def test_decoder_exception_through_the_cli_is_one_line_exit_3(tmp_path):
    script = edited_harness(tmp_path / "h", CRASHING_REGION)
    out = run_cli("--label", "tiny-math", "--limit", "2", "--results_dir", str(tmp_path / "r"), script=script)
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr
    assert "sample tiny_math_test/" in out.stderr.strip().splitlines()[-1]
    debug = run_cli("--label", "tiny-math", "--limit", "2", "--results_dir", str(tmp_path / "r"), "--debug",
                    script=script)
    assert "Traceback" in debug.stderr


ANSWER_KEY_REGION = '''
class DemaskDecoder:
    """Reads the gold answers and writes them, calling the model as little as it can."""
    def __init__(self, mask_id, temperature=0.0, conf_threshold=0.9, kl_threshold=0.01, history_length=2):
        import json
        self.mask_id = mask_id
        self.answers = {}
        for line in open(os.path.join(REPO, "data", "tiny_math_test.jsonl")):
            row = json.loads(line)
            self.answers[row["problem"]] = row["solution"]

    def decode(self, model, input_ids, gen_length, steps, block_length):
        text = model.tokenizer.decode(input_ids[0].tolist())
        problem = next(p for p in self.answers if p in text)
        ids = model.tokenizer("The final answer is " + self.answers[problem], add_special_tokens=False).input_ids
        ids = (ids + [model.stop_ids[0]] * gen_length)[:gen_length]
        x = F.pad(input_ids.to(model.device), (0, gen_length), value=self.mask_id)
        P = input_ids.shape[1]
        for b in range(gen_length // block_length):
            model(x)
            x[0, P + b * block_length:P + (b + 1) * block_length] = torch.tensor(ids[b * block_length:(b + 1) * block_length])
        return x, gen_length // block_length
'''


def test_answer_key_shows_as_improbable_commits_honest_decoders_do_not(tmp_path):
    script = edited_harness(tmp_path / "h", ANSWER_KEY_REGION)
    out = run_cli("--label", "tiny-math", "--limit", "10", "--results_dir", str(tmp_path / "cheat"), script=script)
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stderr and "improbable_commits" in out.stderr
    (cheat,) = (tmp_path / "cheat" / "tiny-math").iterdir()
    cheating = json.load(open(cheat / "summary.json"))["improbable_commits"]
    honest = run_cli("--label", "tiny-math", "--limit", "10", "--results_dir", str(tmp_path / "honest"))
    (run,) = (tmp_path / "honest" / "tiny-math").iterdir()
    assert json.load(open(run / "summary.json"))["improbable_commits"] == 0.0 and "improbable" not in honest.stderr
    assert cheating > cde.IMPROBABLE_WARNING


def test_improbable_commits_counts_unknown_and_low_probabilities():
    traces = [dict(confidence=[0.9, None, 5e-5, 0.5]), dict(confidence=[1e-4, 0.2])]
    assert trajectories.improbable_commits(traces) == 2 / 6
    assert trajectories.improbable_commits([]) is None


# ---------------------------------------------------------------------------
# The decoder gets copies, and what it changes of torch's state is undone


class Vandal(Scripted):
    def decode(self, model, input_ids, gen_length, steps, block_length):
        model.tokenizer.decode = lambda *a, **k: "The final answer is \\boxed{42}"
        with pytest.raises(AttributeError):
            model.stop_ids.append(5)
        with pytest.raises(TypeError):
            model.config["mask_token_id"] = 0
        torch.set_default_dtype(torch.float64)
        torch.set_grad_enabled(False)
        torch.manual_seed(99)
        return super().decode(model, input_ids, gen_length, steps, block_length)


def test_decoder_changes_reach_neither_the_judge_nor_the_next_batch(lm):
    stop_ids, config = list(lm.stop_ids), dict(lm.config)
    torch.manual_seed(5)
    expected_draw = torch.rand(1)
    torch.manual_seed(5)
    gens, _, _ = decode(lm, Vandal(lm.mask_id, ["forward", "fill"]), ONE_BLOCK)
    assert torch.rand(1) == expected_draw  # the global generator is where the batch found it
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()
    assert lm.stop_ids == stop_ids and lm.config == config
    texts, _, _ = core.judge_batch(lm, tasks.MathTask(), SAMPLE, gens)
    assert texts == [lm.tokenizer.decode(gens[0], skip_special_tokens=True)] and "boxed{42}" not in texts[0]


# ---------------------------------------------------------------------------
# Strict numbers


@pytest.mark.parametrize("args,message", [
    (["--temperature", "nan"], "--temperature nan: must be a finite number"),
    (["--top_p", "inf"], "--top_p inf"),
    (["--kl_threshold", "nan"], "--kl_threshold nan"),
    (["--conf_threshold", "nan"], "--conf_threshold nan"),
    (["--decoder", "threshold", "--decoder_args", "alg_threshold=-5"], "alg_threshold=-5 must be >= 0 and <= 1"),
    (["--decoder", "factor", "--decoder_args", "alg_factor=-1"], "alg_factor=-1 must be > 0"),
    (["--decoder", "threshold", "--decoder_args", "alg_threshold=NaN"], "alg_threshold=nan is not a finite number"),
    (["--sweep", "threshold:temperature=nan"], "--sweep temperature nan"),
    (["--decoder", "threshold", "--decoder_args", "threshold=0.8"], "its parameters: temperature, top_p, alg_threshold"),
])
def test_non_finite_and_out_of_range_numbers_exit_2(tmp_path, args, message):
    out = run_cli("--label", "tiny-math", "--results_dir", str(tmp_path), *args)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "tiny-math").exists()


def test_null_test_in_a_code_data_file_is_an_input_error(tmp_path, monkeypatch):
    rows = [json.loads(line) for line in open(os.path.join(REPO, "data", "tiny_code_test.jsonl"))][:2]
    rows[1]["test"] = None
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(tasks.InputError, match=r"code.jsonl:2: field\(s\) \['test'\] must be strings"):
        tasks.CodeTask().load(RunSettings(data=str(data)))


# ---------------------------------------------------------------------------
# Identity covers the code that ran


def test_run_fingerprint_covers_every_harness_file_and_plugins(tmp_path):
    run = cde.resolve(cde.LABELS["tiny-math"].replace(decoder="klass"))
    files = cde.harness_files()
    names = {os.path.relpath(f, REPO) for f in files}
    assert {"custom_demask_eval.py", "utils.py", "demask/decoders.py", "demask/core.py"} <= names
    edited = tmp_path / "decoders.py"
    edited.write_text(open(os.path.join(REPO, "demask", "decoders.py")).read().replace("def choosable", "def choosable "))
    swapped = [str(edited) if f.endswith(os.path.join("demask", "decoders.py")) else f for f in files]
    assert cde.code_digest(swapped) != cde.code_digest(files)  # a helper's edit is a new digest
    assert run.fingerprint == cde.run_fingerprint(run) and run.decoder_fingerprint == cde.decoder_fingerprint(run)
    plugin = tmp_path / "patch.py"
    plugin.write_text("import custom_demask_eval as cde\ncde.DEVIATIONS = []\n")
    cde.PLUGIN_FILES["demask_plugin_patch"] = str(plugin)
    try:
        assert cde.run_fingerprint(run) != run.fingerprint  # a plugin that patches the harness counts too
    finally:
        del cde.PLUGIN_FILES["demask_plugin_patch"]


def test_a_plugin_run_is_not_reused_by_a_plugin_free_sweep(tmp_path):
    plugin = tmp_path / "cheat.py"
    plugin.write_text("import custom_demask_eval as cde\n"
                      "from demask import tasks\n"
                      "tasks.MathTask.judge = lambda self, samples, texts: [dict(pred='x', correct=True) for _ in texts]\n")
    args = ["--label", "tiny-math", "--limit", "4", "--results_dir", str(tmp_path / "r"), "--sweep", "confidence_greedy"]
    patched = run_cli(*args, "--plugin", str(plugin))
    assert patched.returncode == 0 and "accuracy=1.0000" in patched.stdout
    honest = run_cli(*args)
    assert honest.returncode == 0 and "is complete, skipped" not in honest.stderr
    assert "accuracy=1.0000" not in honest.stdout


def test_the_sandbox_layer_in_force_is_recorded(tmp_path):
    from demask import sandbox
    for label, expected in (("tiny-code", sandbox.layer_description()), ("tiny-math", None)):
        out = run_cli("--label", label, "--limit", "2", "--results_dir", str(tmp_path))
        assert out.returncode == 0, out.stderr
        (run,) = (tmp_path / label).iterdir()
        config, summary = (json.load(open(run / name)) for name in ("config.json", "summary.json"))
        assert config["sandbox"] == summary["sandbox"] == expected
