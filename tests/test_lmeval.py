"""The lm-eval model `demask` (demask/lmeval.py) and the local tasks in configs/lm_eval_tasks:
the same numbers as the harness's own labels, LLaDA's Monte Carlo log-likelihood on hand-checked
cases, generation length and stop strings. Skipped without lm-eval (requirements-lmeval.txt)."""
import glob
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -r requirements-lmeval.txt")

from demask import REPO  # noqa: E402
from demask import lmeval  # noqa: E402

TINY = os.path.join(REPO, "models", "tiny-llada")
TASKS = os.path.join(REPO, "configs", "lm_eval_tasks")


@pytest.fixture(scope="module")
def cde():
    return lmeval.entry()


def label_args(cde, label):
    run = cde.LABELS[label]
    return dict(model=TINY, gen_length=run.gen_length, steps=run.steps, block_length=run.block_length,
                temperature=run.temperature, conf_threshold=run.conf_threshold, kl_threshold=run.kl_threshold,
                history_length=run.history_length, batch_size=run.batch_size)


def cli_run(cde, label, decoder, results_dir, limit=None):
    """The harness's own run of a label: (metrics, config.json, records by row index)."""
    metrics = cde.main(["--label", label, "--decoder", decoder, "--results_dir", str(results_dir),
                        *(["--limit", str(limit)] if limit else [])])
    run_dir, = glob.glob(os.path.join(str(results_dir), label, "*"))
    config = json.load(open(os.path.join(run_dir, "config.json")))
    records = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    return metrics, config, {int(r["id"].rsplit("/", 1)[1]): r for r in records}


def lmeval_run(cde, task, label, decoder, monkeypatch, limit=None):
    """lm-eval's simple_evaluate on the local task with the `demask` model: (metrics, results, model)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    monkeypatch.chdir(REPO)  # the tasks' data_files are relative to the repository root
    lm = lmeval.DemaskLM(decoder=decoder, **label_args(cde, label))
    results = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=TASKS),
                              apply_chat_template=True, confirm_run_unsafe_code=True, limit=limit)
    return results["results"][task], results, lm


@pytest.mark.parametrize("decoder,limit", [("klass", None), ("threshold", None), ("random", 32)])
def test_tiny_math_equals_the_label(cde, decoder, limit, tmp_path, monkeypatch):
    """Accuracy, avg_steps, and per sample the generation and counted forwards, as the CLI's tiny-math
    (random: its positions are drawn, so the per-batch seeds must match too; 32 samples, 64 forwards each)."""
    metrics, config, records = cli_run(cde, "tiny-math", decoder, tmp_path, limit)
    got, results, lm = lmeval_run(cde, "demask_tiny_math", "tiny-math", decoder, monkeypatch, limit)
    assert got["acc,none"] == pytest.approx(metrics["accuracy"], abs=1e-12)
    assert got["avg_steps,none"] == pytest.approx(metrics["avg_steps"], abs=1e-9)
    mine = {r["doc_id"]: r for r in lm._demask_records}
    assert sorted(mine) == sorted(records) == list(range(limit or 100))
    for i, r in records.items():
        assert (mine[i]["generation"], mine[i]["forwards"], mine[i]["seed"]) == (r["generation"], r["steps"], r["seed"])
    info = results["config"]["demask"]
    assert info["decoder_fingerprint"] == config["decoder_fingerprint"]
    assert info["environment"]["torch"] == torch.__version__ and info["n_generations"] == (limit or 100)


@pytest.mark.parametrize("decoder", sorted(lmeval.entry().DECODERS))
def test_every_registered_decoder_runs_through_lm_eval_as_through_the_label(cde, decoder, tmp_path, monkeypatch):
    """Every decoder of the zoo (and the editable one): on the first 8 tiny-math problems, lm-eval's
    accuracy, avg_steps and per-sample generations and counted forwards are the CLI's."""
    metrics, _, records = cli_run(cde, "tiny-math", decoder, tmp_path, 8)
    got, _, lm = lmeval_run(cde, "demask_tiny_math", "tiny-math", decoder, monkeypatch, 8)
    assert got["acc,none"] == pytest.approx(metrics["accuracy"], abs=1e-12)
    assert got["avg_steps,none"] == pytest.approx(metrics["avg_steps"], abs=1e-9)
    mine = {r["doc_id"]: r for r in lm._demask_records}
    assert all((mine[i]["generation"], mine[i]["forwards"]) == (r["generation"], r["steps"]) for i, r in records.items())


def test_tiny_code_equals_the_label(cde, tmp_path, monkeypatch):
    """pass@1 and avg_steps as the CLI's tiny-code (judged by the same sandboxed checker)."""
    metrics, _, records = cli_run(cde, "tiny-code", "klass", tmp_path)
    got, _, lm = lmeval_run(cde, "demask_tiny_code", "tiny-code", "klass", monkeypatch)
    assert got["pass@1,none"] == pytest.approx(metrics["pass@1"], abs=1e-12)
    assert got["avg_steps,none"] == pytest.approx(metrics["avg_steps"], abs=1e-9)
    mine = {r["doc_id"]: r for r in lm._demask_records}
    assert all(mine[i]["generation"] == r["generation"] for i, r in records.items())


def test_prompts_are_the_harness_prompts(cde, monkeypatch):
    """The rendered lm-eval contexts tokenize to the harness's prompt ids (encode_prompt)."""
    from lm_eval.tasks import TaskManager, get_task_dict
    from demask.tasks import MathTask, encode_prompt
    monkeypatch.chdir(REPO)
    lm = lmeval.DemaskLM(model=TINY, decoder="klass", gen_length=64, steps=64, block_length=32, batch_size=16)
    task = get_task_dict(["demask_tiny_math"], TaskManager(include_path=TASKS))["demask_tiny_math"]
    samples = MathTask().load(cde.LABELS["tiny-math"])[:3]
    for doc, sample in zip(list(task.test_docs())[:3], samples):
        context = task.fewshot_context(doc, 0, apply_chat_template=True, chat_template=lm.apply_chat_template)
        assert lm.encode_context(context) == encode_prompt(lm.lm, sample)


@pytest.fixture(scope="module")
def tiny():
    return lmeval.DemaskLM(model=TINY, decoder="klass", gen_length=64, steps=64, block_length=32, batch_size=4,
                           mc_num=4, mc_batch=2)


def request(*args):
    return SimpleNamespace(args=args)


def test_one_token_loglikelihood_is_exact(tiny):
    """A one-token target is masked alone in every Monte Carlo sample (ratio 1): the estimate is
    log p(target | prefix, one mask) exactly."""
    context, continuation = "Tom has 3 apples and buys 5", " more"
    prefix, target = tiny.encode_pair(context, continuation)
    assert len(target) == 1
    x = torch.tensor([prefix + [tiny.lm.mask_id]])
    exact = torch.log_softmax(tiny.lm.logits(x, None)[0, -1], -1)[target[0]].item()
    (ll, greedy), = tiny.loglikelihood([request(context, continuation)])
    assert ll == pytest.approx(exact, abs=1e-5) and greedy is False


def test_two_token_loglikelihood_converges_to_the_expectation(tiny):
    """mc_batch 2 on a two-token target: one row masks both (ratio 1), one masks one of the two at random
    (ratio 1/2), so the estimate's expectation is -(CE0+CE1 | both masked)/2 - (CE0|0 masked + CE1|1 masked)/2."""
    context, continuation = "Tom has 3 apples and", " apples."
    prefix, target = tiny.encode_pair(context, continuation)
    assert len(target) == 2
    P, m = len(prefix), tiny.lm.mask_id

    def ce(masked):
        x = torch.tensor([prefix + [m if j in masked else t for j, t in enumerate(target)]])
        logp = torch.log_softmax(tiny.lm.logits(x, None)[0], -1)
        return [-logp[P + j, target[j]].item() for j in range(2)]
    both, only0, only1 = ce({0, 1}), ce({0})[0], ce({1})[1]
    expected = -(sum(both) / 2 + (only0 + only1) / 2)
    model = lmeval.DemaskLM(model=TINY, decoder="klass", gen_length=64, steps=64, block_length=32, mc_num=1024,
                            mc_batch=2)
    (ll, _), = model.loglikelihood([request(context, continuation)])
    spread = abs(only0 - only1) / 2 / math.sqrt(512)  # std of the mean over 512 forwards
    assert abs(ll - expected) <= 5 * spread + 1e-4


def test_generation_length_and_stop_strings(tiny):
    assert [lmeval.generation_length(64, 32, n) for n in (None, 100, 64, 40, 33, 32, 10)] == [64, 64, 64, 64, 64, 32, 32]
    context = tiny.apply_chat_template([{"role": "user", "content": "Tom has 3 apples and buys 5 more."}])
    tiny._demask_records.clear()
    full, = tiny.generate_until([request(context, dict(until=[], max_gen_toks=20))])
    assert tiny._demask_records[-1]["gen_length"] == 32 and tiny._demask_records[-1]["steps"] == 32
    assert full.forwards == tiny._demask_records[-1]["forwards"] > 0
    stop = full[len(full) // 2:][:2] if len(full) > 3 else None
    if stop:
        cut, = tiny.generate_until([request(context, dict(until=["zzz-not-there", stop], max_gen_toks=20))])
        assert cut == full[:full.index(stop)]


def test_rolling_loglikelihood_is_refused(tiny):
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        tiny.loglikelihood_rolling([request("some text")])


def test_decoder_args_and_refused_settings():
    assert lmeval.parse_decoder_args("alg_threshold=0.8;score=margin") == {"alg_threshold": 0.8, "score": "margin"}
    with pytest.raises(ValueError, match="unknown model_args"):
        lmeval.DemaskLM(model=TINY, gen_lenght=64)
    with pytest.raises(ValueError, match="cache"):
        lmeval.DemaskLM(model=TINY, cache="full")


def test_command_line_writes_the_sidecar(tmp_path, monkeypatch):
    """`python -m demask.lmeval` is lm-eval's command line with `demask` registered: results carry
    config.demask (fingerprint, environment) and demask_samples.jsonl lies beside them."""
    import subprocess
    import sys
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "demask.lmeval", "--model", "demask", "--model_args",
                           f"model={TINY},decoder=klass,gen_length=64,steps=64,block_length=32,batch_size=16",
                           "--tasks", "demask_tiny_math", "--include_path", TASKS, "--apply_chat_template",
                           "--limit", "4", "--output_path", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results, = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    info = json.load(open(results))["config"]["demask"]
    assert info["decoder"] == "klass" and len(info["decoder_fingerprint"]) == 16
    rows = [json.loads(line) for line in open(out / lmeval.SAMPLES_FILE)]
    assert len(rows) == 4 and all(r["forwards"] > 0 and r["tokens_per_forward"] is not None for r in rows)
