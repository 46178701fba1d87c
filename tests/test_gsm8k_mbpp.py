"""GSM8K and MBPP: data, judges, labels end to end; Dream's own schedule (dream_schedule)."""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import custom_demask_eval as cde
from demask import core
from demask import tasks
from demask import decoders
from demask.settings import RunSettings
import utils
from conftest import FIXTURES, REPO
from test_decoders import MASK, per_position, trace


def rows(name):
    return [json.loads(line) for line in open(os.path.join(REPO, "data", name))]

# ---------------------------------------------------------------- data


def test_shipped_data():
    gsm8k, mbpp = rows("gsm8k_test.jsonl"), rows("mbpp_test.jsonl")
    assert len(gsm8k) == 1319 and all("#### " in r["answer"] for r in gsm8k)
    assert [r["task_id"] for r in mbpp] == list(range(11, 511))
    assert all(len(r["test_list"]) == 3 for r in mbpp)
    assert len(tasks.Gsm8kTask().load(cde.LABELS["llada-gsm8k"])) == 1319
    assert len(tasks.MbppTask().load(cde.LABELS["dream-mbpp"])) == 500

# ---------------------------------------------------------------- GSM8K judge


@pytest.mark.parametrize("text,answer", [
    ("So she pays $1,234 in total. The answer is $1,234.", "1234"),  # commas and $ fall away, trailing '.' too
    ("Janet makes 9 * 2 = 18 dollars.\n#### 72", "72"),                # no "answer is": the last number
    ("The final answer is 3.50", "3.5"),                               # decimal zeros stripped
    ("The final answer is 7.00 dollars", "7"),
    ("It drops by 5 degrees, so the answer is -5.", "-5"),             # negative numbers keep their sign
    ("The temperature is now -12", "-12"),
    ("The answer is 18 eggs; earlier I wrote 20.", "18"),             # first number after the last "answer is"
    ("The answer is 10-3 = 7", "10"),                                  # ... even in an expression (KLASS)
    ("3 + 4 = 7, so the final answer is \\boxed{7}.", "7"),
    ("The answer is \\boxed{1,000}", "1"),                             # boxed: first number, comma ends it (KLASS)
    ("The answer is \\boxed{18.}", "18."),                             # boxed: not normalised (KLASS)
    ("I do not know.", ""),
])
def test_gsm8k_answer(text, answer):
    assert utils.gsm8k_answer(text) == answer


def test_gsm8k_is_correct():
    assert utils.gsm8k_is_correct("5 + 3 = 8\n#### 1,234", "The answer is $1,234.") == ("1234", True)
    assert utils.gsm8k_is_correct("#### 3.5", "The answer is 3.50")[1]
    assert utils.gsm8k_is_correct("#### 72", "#### 72")[1]
    assert utils.gsm8k_is_correct("#### -3", "The final answer is -3.")[1]
    assert not utils.gsm8k_is_correct("#### 3", "The final answer is -3.")[1]
    assert utils.gsm8k_is_correct("#### 18", "No number here.") == ("", False)
    with pytest.raises(ValueError, match="####"):
        utils.gsm8k_is_correct("18", "18")


def test_gsm8k_task_prompt_and_judge():
    task = tasks.Gsm8kTask()
    samples = task.load(cde.LABELS["llada-gsm8k"])
    first = samples[0]
    assert first["id"] == "gsm8k_test/0" and first["messages"][0] == {"role": "system", "content": tasks.MATH_SYSTEM}
    assert first["messages"][1]["content"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    verdicts = task.judge(samples[:2], ["The final answer is $18.", "The final answer is 4."])
    assert verdicts == [dict(extracted="18", correct=True), dict(extracted="4", correct=False)]

# ---------------------------------------------------------------- MBPP judge


def test_mbpp_problem_format():
    task = {r["task_id"]: r for r in rows("mbpp_test.jsonl")}
    p = utils.mbpp_problem(task[11], "mbpp/11")
    assert p["prompt"] == "" and p["entry_point"] == "remove_Occ"
    assert p["test"].startswith('assert remove_Occ("hello","l") == "heo"\n') and p["test"].endswith(
        "def check(candidate):\n    pass\n")
    assert utils.mbpp_entry_point(task[56]) == "check"  # helper rev() comes first in the code
    assert utils.mbpp_problem(task[367], "mbpp/367")["test"].startswith("root = Node(1)")


def test_mbpp_reference_solutions_pass_the_humaneval_checker():
    """All 500 reference solutions through utils.check_code (about 10 s on 2 cores). Task 123's
    solution is quadratic and takes 3.5-4.6 s on the machines measured, so it times out at 3 s."""
    tasks = rows("mbpp_test.jsonl")
    problems = {f"mbpp/{r['task_id']}": utils.mbpp_problem(r, f"mbpp/{r['task_id']}") for r in tasks}
    results = utils.check_code(problems, {f"mbpp/{r['task_id']}": r["code"] + "\n" for r in tasks}, timeout=3.0)
    failed = {k: v["result"] for k, v in results.items() if not v["passed"]}
    assert len(results) == 500 and set(failed) <= {"mbpp/123"}, failed
    assert all(v == "timed out" for v in failed.values())


def test_mbpp_task_prompt_and_judge():
    task = tasks.MbppTask()
    samples = {s["id"]: s for s in task.load(cde.LABELS["llada-mbpp"])}
    assert samples["mbpp/11"]["messages"] == [{"role": "user", "content": (
        "You are an expert Python programmer, and here is your task: Write a python function to remove first and "
        "last occurrence of a given character from the string. Your code should pass these tests:\n\n"
        "['assert remove_Occ(\"hello\",\"l\") == \"heo\"', 'assert remove_Occ(\"abcda\",\"a\") == \"bcd\"', "
        "'assert remove_Occ(\"PHP\",\"P\") == \"H\"']\n[BEGIN]")}]
    texts = {"mbpp/11": "```python\ndef remove_Occ(s, ch):\n    s = s.replace(ch, '', 1)\n"
                        "    i = s.rfind(ch)\n    return s if i < 0 else s[:i] + s[i + 1:]\n```\n",
             "mbpp/12": "def sort_matrix(m):\n    return m\n",
             "mbpp/14": "return l * b * h / 2",
             "mbpp/56": "```py\ndef rev(n):\n    return int(str(n)[::-1])\n"
                        "def check(n):\n    return 2 * rev(n) == n + 1\n```"}
    verdicts = task.judge([samples[i] for i in texts], list(texts.values()))
    assert [v["correct"] for v in verdicts] == [True, False, False, True]
    assert verdicts[1]["result"].startswith("failed") and verdicts[0]["completion"].startswith("def remove_Occ")

# ---------------------------------------------------------------- labels end to end on the tiny random model


@pytest.mark.parametrize("label,task,short,metric", [("llada-gsm8k", "gsm8k", "acc", "accuracy"),
                                                     ("llada-mbpp", "mbpp", "pass@1", "pass@1")])
def test_label_end_to_end(tmp_path, tiny_llada, label, task, short, metric):
    out = subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), "--results_dir", str(tmp_path),
                          "--label", label, "--model_path", tiny_llada, "--limit", "3", "--gen_length", "8",
                          "--steps", "8", "--block_length", "8"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert re.search(rf"^TRAIN_METRICS: {task} 3/3 {re.escape(short)}=\d\.\d{{3}} avg_steps=8\.0$", out.stdout, re.M)
    assert re.search(rf"^{re.escape(metric)}_{label}: \d\.\d{{4}}$", out.stdout, re.M)
    assert f"avg_steps_{label}: 8.0000" in out.stdout and f"n_samples_{label}: 3.0000" in out.stdout
    (run,) = (tmp_path / label).iterdir()
    records = [json.loads(line) for line in open(run / "samples.jsonl")]
    assert len(records) == 3 and all("correct" in r for r in records)
    assert all(("extracted" in r) if task == "gsm8k" else r["result"] for r in records)


@pytest.mark.parametrize("name", ["llada_gsm8k", "llada_mbpp", "dream_gsm8k", "dream_mbpp"])
def test_scripts_name_their_label(name):
    path = os.path.join(REPO, "scripts", f"{name}.sh")
    assert f"--label {name.replace('_', '-')} " in open(path).read() and os.access(path, os.X_OK)

# ---------------------------------------------------------------- dream_schedule


def test_dream_counts_by_hand():
    # t = linspace(1, 0.001, 5) = 1, 0.75025, 0.5005, 0.25075, 0.001; M = 8, 7, 5, 3
    # int(8 * 0.24975) = 1, int(7 * 0.33289) = 2, int(5 * 0.49900) = 2, then all 3
    assert decoders.dream_counts(8, 4) == [1, 2, 2, 3]
    assert decoders.dream_counts(4, 2) == [1, 3]  # int(4 * 0.4995) = 1
    full = decoders.dream_counts(256, 256)  # 256 * (1 - t1/t0) = 0.999: Dream's first step commits nothing
    assert full[:3] == [0, 1, 1] and sum(full) == 256 and full.count(0) == 1 and full[-1] == 2


@pytest.mark.parametrize("block,expected", [(8, [1, 2, 2, 3]), (4, [1, 3, 1, 3])])
def test_dream_schedule_commits_the_counts_by_confidence(block, expected):
    conf = [0.5, 0.9, 0.3, 0.8, 0.6, 0.7, 0.4, 0.95]
    decoder = decoders.build_decoder("dream_schedule", MASK, dict(temperature=0.0), {})
    commits, _, _ = trace(decoder, per_position(conf), 8, 4, block)
    assert [len(c) for c in commits] == expected
    if block == 8:
        assert commits == [{7}, {1, 3}, {5, 4}, {0, 6, 2}]


def test_dream_schedule_empty_step_and_origin_with_scripted_logits():
    decoder = decoders.build_decoder("dream_schedule", MASK, {}, {})
    commits, _, _ = trace(decoder, per_position([0.9] * 4), 4, 8, 4)  # int(4 * 0.1249) = 0, ...: five empty steps
    assert [len(c) for c in commits] == decoders.dream_counts(4, 8) == [0, 0, 0, 0, 0, 1, 1, 2]
    torch.manual_seed(0)
    origin = decoders.build_decoder("dream_schedule", MASK, {}, {"alg": "origin"})
    commits, _, _ = trace(origin, per_position([0.9] * 16), 16, 4, 16)
    assert len(commits) == 4 and sum(map(len, commits)) == 16


def test_dream_schedule_scores_follow_alg():
    # position 0: confident but two-way split for the runner-up; position 1: lower top-1, larger margin
    p = torch.tensor([[[0.50, 0.45, 0.05, 0, 0, 0, 0, 0], [0.45, 0.05, 0.05, 0.05, 0.05, 0.05, 0.30, 0]]],
                     dtype=torch.float64)
    logits = p.log()
    candidates = torch.ones(1, 2, dtype=torch.bool)
    batch = SimpleNamespace(model=SimpleNamespace(mask_id=MASK), fraction=torch.tensor([0.5, 1.0]), steps_per_block=2)
    picks = {}
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        decoder = decoders.DreamScheduleDecoder(MASK, alg=alg)
        commit, tokens = decoder.select(logits, candidates, None, torch.zeros(1, dtype=torch.long), batch)
        picks[alg] = commit[0].nonzero().flatten().tolist()
        assert tokens.tolist() == [[0, 0]]
    assert picks == {"maskgit_plus": [0], "topk_margin": [1], "entropy": [0]}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("alg", list(decoders.DREAM_ALGS))
def test_dream_schedule_end_to_end(request, family, alg):
    model = core.load_model(request.getfixturevalue(f"tiny_{family}"), device="cpu")
    samples = [dict(id=f"s/{i}", prompt_ids=p) for i, p in enumerate([[0, 5, 6, 7, 8], [0, 11], [0, 12, 13]])]
    for cfg in (RunSettings(gen_length=16, steps=8, block_length=8, temperature=0.0),
                RunSettings(gen_length=8, steps=256, block_length=8, temperature=0.5, top_p=0.9)):
        decoder = decoders.build_decoder("dream_schedule", model.mask_id, cfg, {"alg": alg})
        gens, counted, reported = core.decode_batch(cfg, model, decoder, samples, seed=0)  # rule checks inside
        assert reported == [max(counted)] * 3  # a batch reports its longest row
        assert counted == [cfg.steps] * 3 if alg != "origin" else max(counted) <= cfg.steps
        assert all(len(g) == cfg.gen_length and model.mask_id not in g for g in gens)


def test_dream_schedule_registry_and_info():
    info = decoders.DECODERS["dream_schedule"]
    assert info.method_type == "schedule" and "steps" in decoders.method_config_keys("dream_schedule")
    decoder = decoders.build_decoder("dream_schedule", 0, {}, {"alg": "entropy"})
    assert decoder.info(256, 256, 256) == dict(alg="entropy", eps=1e-3, position_score="neg_entropy", empty_steps=1,
                                               last_step_commits=2)
    with pytest.raises(ValueError, match="dream_schedule alg"):
        decoders.build_decoder("dream_schedule", 0, {}, {"alg": "klass"})


def dream_origin(model, settings, prompts, seed):
    run = RunSettings(gen_length=settings["gen_length"], steps=settings["steps"], block_length=settings["gen_length"],
                      temperature=settings["temperature"], top_p=settings["top_p"])
    decoder = decoders.build_decoder("dream_schedule", model.mask_id, run, {"alg": "origin"})
    return core.decode_batch(run, model, decoder, [dict(id=str(i), prompt_ids=p) for i, p in enumerate(prompts)], seed)


@pytest.mark.parametrize("setting,dream_masks", [(0, [(5, 0, 2)]), (1, [])], ids=["greedy", "temperature-top_p"])
def test_dream_origin_draws_as_dream(setting, dream_masks):
    """Dream's _sample (alg origin) recorded on the tiny Dream (tests/fixtures/dream_origin_upstream.json):
    the same seed gives Dream's tokens, alone and in left-padded batches of four, except where Dream's
    sample_tokens proposes the mask id itself (its output keeps a mask there; ours never proposes it)."""
    recorded = json.load(open(os.path.join(FIXTURES, "dream_origin_upstream.json")))
    model = core.load_model(os.path.join(FIXTURES, "dream_tiny"), device="cpu")
    r = recorded["runs"][setting]
    prompts = recorded["prompt_ids"]
    alone = [dream_origin(model, r["settings"], [p], seed) for p, seed in zip(prompts, r["single_seeds"])]
    assert [a[0][0] for a in alone] == r["single"] and len(prompts) == 24
    assert max(a[1][0] for a in alone) <= r["settings"]["steps"]  # Dream always spends all 16
    differ = []
    for j, (seed, upstream) in enumerate(zip(r["batch_seeds"], r["batches"])):
        gens = dream_origin(model, r["settings"], prompts[4 * j:4 * j + 4], seed)[0]
        differ += [(j, i, pos) for i, (a, b) in enumerate(zip(gens, upstream)) for pos, (x, y) in enumerate(zip(a, b))
                   if x != y]
        assert all(upstream[i][pos] == model.mask_id for jj, i, pos in differ if jj == j)
    assert differ == dream_masks

# ---------------------------------------------------------------- Dream-style proposals renormalise


def test_dream_style_confidence_is_renormalised_over_committable_ids():
    """The mask id and the padded logit columns are removed before Dream's softmax, so the
    confidence is the probability renormalised over committable ids; KLASS's sample_tokens keeps
    them in the softmax (deviation listed in DEVIATIONS). The LLaDA-style confidence stays the
    clean probability."""
    model = SimpleNamespace(mask_id=MASK, n_tokens=6)  # ids 6 (padding) and 7 (mask) cannot be committed
    p = torch.tensor([[[0.2, 0.1, 0.05, 0.05, 0.05, 0.05, 0.1, 0.4]]], dtype=torch.float64)
    tokens, clean, conf = decoders.propose_tokens(p.log(), 0.0, None, "dream", model)
    assert tokens.item() == 0 and torch.allclose(clean, p)
    assert conf.item() == pytest.approx(0.2 / 0.5)
    _, _, llada_conf = decoders.propose_tokens(p.log(), 0.0, None, "llada", model)
    assert llada_conf.item() == pytest.approx(0.2)
    assert any("renormalised" in d for d in cde.DEVIATIONS) and any("get_transfer_index_dynamic" in d
                                                                     for d in cde.DEVIATIONS)
