"""Learned unmasking policies: the network, the action rules, the decoder, GRPO and its checkpoints."""
import itertools
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import custom_demask_eval as cde
from demask import core, decoders, tasks
from demask import policy
from demask.settings import RunSettings
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import train_policy  # noqa: E402


def small_config(tmp_path, model_path, **extra):
    cfg = train_policy.load_config(os.path.join(REPO, "configs", "tiny_policy.json"))
    cfg.update(dict(model_path=model_path, gen_length=8, block_length=4, num_generations=2, prompts_per_step=1,
                    max_steps=2, save_steps=1, warmup_steps=1), **extra)
    return cfg


def test_shapes_and_smart_init():
    net = policy.PolicyNet(policy.PolicyConfig())
    logits = net(torch.rand(3, 64), torch.rand(3, 64) < 0.5, torch.rand(3))
    assert logits.shape == (3, 64)
    assert torch.allclose(torch.sigmoid(logits), torch.full_like(logits, 1 / (1 + math.exp(2))))
    assert abs(1 / (1 + math.exp(2)) - 0.12) < 0.001


def test_bernoulli_argmax_always_unmasks_one():
    torch.manual_seed(0)
    logits = torch.full((500, 6), -30.0, dtype=torch.float64)
    candidates = torch.rand(500, 6) < 0.5
    candidates[:, 2] = True
    commit, _, logp = policy.choose(logits, candidates, "bernoulli-argmax", 1.0, torch.tensor(0.0))
    assert (commit.sum(1) >= 1).all() and not (commit & ~candidates).any()
    assert torch.allclose(logp, torch.zeros_like(logp), atol=1e-9)  # the fallback is certain here


def test_bernoulli_argmax_likelihood_sums_to_one():
    logits = torch.tensor([[0.3, -1.0, 0.5]], dtype=torch.float64)
    candidates = torch.ones(1, 3, dtype=torch.bool)
    total = sum(policy.bernoulli_argmax_logp(logits, candidates, torch.tensor([bits], dtype=torch.bool), 1.0).exp()
                for bits in itertools.product([False, True], repeat=3) if any(bits))
    assert abs(float(total) - 1) < 1e-12


def brute_force_dpls(z, stop, seq):
    left, prob = list(range(len(z))), 1.0
    for j, i in enumerate(seq):
        prob *= math.exp(z[i]) / (sum(math.exp(z[a]) for a in left) + (math.exp(stop) if j else 0))
        left.remove(i)
    if left:
        prob *= math.exp(stop) / (sum(math.exp(z[a]) for a in left) + math.exp(stop))
    return prob


def test_dpls_likelihood_equals_brute_force_over_orderings():
    z, stop = [0.4, -0.7, 1.1], 0.3
    logits, candidates = torch.tensor([z], dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool)
    total = 0.0
    for k in range(1, 4):
        for seq in itertools.permutations(range(3), k):
            rank = torch.full((1, 3), -1)
            for r, i in enumerate(seq):
                rank[0, i] = r
            p = float(policy.dpls_logp(logits, candidates, rank, torch.tensor(stop, dtype=torch.float64), 1.0).exp())
            assert abs(p - brute_force_dpls(z, stop, seq)) < 1e-12
            total += p
    assert abs(total - 1) < 1e-12


def test_dpls_samples_follow_the_likelihood():
    torch.manual_seed(0)
    logits = torch.tensor([[0.4, -0.7, 1.1]], dtype=torch.float64).expand(20000, 3)
    candidates = torch.ones(20000, 3, dtype=torch.bool)
    stop = torch.tensor(0.3, dtype=torch.float64)
    rank = policy.dpls_sample(logits, candidates, stop, 1.0)
    assert ((rank >= 0).sum(1) >= 1).all()
    first = rank.eq(0).double().mean(0)
    assert torch.allclose(first, torch.softmax(logits[0], -1), atol=0.015)  # the first pick has no STOP


def test_advantages_have_no_std_normalisation():
    r = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    assert torch.allclose(train_policy.advantages(r, 3),
                          torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_both_reward_forms():
    mult = train_policy.reward([1, 1, 0], [1, 16, 4], 64, 2.0, "correctness_mult")
    assert torch.allclose(mult, torch.tensor([1.0, (49 / 64) ** 2, 0.0], dtype=torch.float64))
    add = train_policy.reward([1, 0], [16, 32], 64, 0.5, "correctness_add")
    assert torch.allclose(add, torch.tensor([1 - 0.125, -0.25], dtype=torch.float64))


def test_policy_decoder_under_the_rule_checks_on_the_bundled_model(tmp_path):
    torch.manual_seed(0)
    policy.save_policy(policy.PolicyNet(policy.PolicyConfig()), str(tmp_path / "p"))
    lm = core.load_model(cde.TINY, device="cpu")
    task = tasks.TASKS["math"]()
    cfg = cde.LABELS["tiny-math"].replace(block_length=32)
    samples = task.load(cfg)[:3]
    for s in samples:
        s["prompt_ids"] = tasks.encode_prompt(lm, s)
    for mode in policy.SAMPLING_MODES:
        decoder = decoders.build_decoder("policy", lm.mask_id, cfg, dict(policy_path=str(tmp_path / "p"), sampling_mode=mode))
        gens, counted, _ = core.decode_batch(cfg, lm, decoder, samples, seed=0)  # rule checks inside
        assert all(len(g) == 64 for g in gens) and all(c >= 2 for c in counted)


def test_save_load_round_trip(tmp_path):
    net = policy.PolicyNet(policy.PolicyConfig(full_context=False, smart_init=-1.0))
    torch.nn.init.normal_(net.out.weight)
    policy.save_policy(net, str(tmp_path))
    back = policy.load_policy(str(tmp_path))
    assert back.config == net.config
    x = (torch.rand(2, 8), torch.rand(2, 8) < 0.5, torch.rand(2))
    assert torch.equal(back(*x), net(*x))


def step_rollouts(cfg, net, monkeypatch):
    """One step's rollouts on the bundled model, with the generations handed to the judge."""
    lm = train_policy.load_frozen_model(cfg, torch.device("cpu"))
    task = tasks.TASKS["math"]()
    prompts = [dict(s, prompt_ids=tasks.encode_prompt(lm, s)) for s in task.load(RunSettings(data=cfg["train_data"]))[:3]]
    decoder = policy.PolicyDecoder.from_network(lm.mask_id, net, sampling_mode=cfg["sampling_mode"],
                                                policy_temperature=cfg["policy_temperature"])
    judged, judge = [], train_policy.judge_batch
    monkeypatch.setattr(train_policy, "judge_batch",
                        lambda lm, task, batch, gens: judged.extend(gens) or judge(lm, task, batch, gens))
    return lm, prompts, train_policy.rollout(cfg, lm, decoder, task, prompts), judged


def test_a_steps_rollouts_are_one_batch_equal_to_one_row_decodes(tmp_path, monkeypatch):
    # a policy that never draws (sigmoid(-2 / 1e-3) = 0) falls back to its argmax, the lowest masked
    # position: left to right, one per forward; the expert rows are the threshold rule
    cfg = small_config(tmp_path, cde.TINY, gen_length=16, block_length=8, num_generations=2, expert_generations=1,
                       policy_temperature=1e-3, expert_threshold=0.9)
    torch.manual_seed(0)
    lm, prompts, (trace, steps, correct, expert), judged = step_rollouts(cfg, policy.PolicyNet(policy.PolicyConfig()),
                                                                         monkeypatch)
    assert expert.tolist() == [False, False, True] * 3 and len(judged) == 9
    run = RunSettings(gen_length=16, steps=16, block_length=8)
    for row, prompt in enumerate(s for s in prompts for _ in range(3)):
        name, args = ("threshold", dict(alg_threshold=0.9)) if expert[row] else ("left_to_right", {})
        gens, counted, _ = core.decode_batch(run, lm, decoders.build_decoder(name, lm.mask_id, run, args), [prompt], seed=0)
        assert judged[row] == gens[0] and steps[row] == counted[0]
    assert (steps[~expert] == 16).all() and (steps[expert] < 16).all()
    assert torch.equal(trace["row"].bincount(minlength=9), steps)  # one record per counted forward of a row


def test_recorded_likelihoods_are_the_ones_grpo_recomputes(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, cde.TINY, gen_length=16, block_length=16, num_generations=3, expert_generations=1)
    torch.manual_seed(0)
    net = policy.PolicyNet(policy.PolicyConfig())
    torch.nn.init.normal_(net.out.weight, std=0.5)
    _, _, (trace, steps, _, expert), _ = step_rollouts(cfg, net, monkeypatch)
    logits = net(trace["conf"], trace["masked"], trace["t"]).double()
    logp = policy.action_logp(logits, trace["candidates"], trace["action"], "bernoulli-argmax", 1.0, net.stop.double())
    assert torch.allclose(logp, trace["logp"], atol=1e-9) and (logp < 0).any()
    adv = torch.linspace(-1, 2, len(steps), dtype=torch.float64)
    assert torch.isclose(train_policy.grpo_loss(cfg, net, trace, adv), -adv.mean())  # every ratio is 1


def test_time_budget_stops_with_a_checkpoint_that_resumes_the_same_run(tmp_path, tiny_llada):
    cfg = small_config(tmp_path, tiny_llada, max_steps=3, save_steps=10, expert_generations=1)
    whole = train_policy.train(cfg, str(tmp_path / "whole"))
    out = str(tmp_path / "budget")
    stopped = train_policy.train(dict(cfg, max_minutes=1e-9), out)
    assert stopped["step"] == 1 and train_policy.latest_checkpoint(out).endswith("checkpoint-1")
    assert torch.load(os.path.join(out, "checkpoint-1", "trainer_state.pt"), weights_only=False)["step"] == 1
    os.makedirs(os.path.join(out, "checkpoint-7.tmp"))  # a save that was cut short is not a checkpoint
    resumed = train_policy.train(cfg, out, resume=True)
    assert resumed == dict(whole, seconds=resumed["seconds"], skipped_fraction=resumed["skipped_fraction"])
    a, b = (policy.load_policy(os.path.join(d, "checkpoint-3")).state_dict() for d in (str(tmp_path / "whole"), out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_skipped_step_when_all_advantages_are_zero(tmp_path, tiny_llada, monkeypatch):
    cfg = small_config(tmp_path, tiny_llada)
    monkeypatch.setattr(train_policy, "reward", lambda correct, steps, *a: torch.ones(len(steps), dtype=torch.float64))
    metrics = train_policy.train(cfg, str(tmp_path / "run"))
    before = policy.load_policy(str(tmp_path / "run" / "checkpoint-0")).state_dict()
    assert metrics["skipped_fraction"] == 1.0
    after = policy.load_policy(str(tmp_path / "run" / "checkpoint-2")).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_grpo_step_end_to_end_and_checkpoint(tmp_path, tiny_llada, monkeypatch):
    cfg = small_config(tmp_path, tiny_llada, max_steps=1, expert_generations=1)
    correct = iter([1, 0] * 10)
    monkeypatch.setattr(train_policy, "reward", lambda c, steps, *a: torch.tensor(
        [float(next(correct)) for _ in steps], dtype=torch.float64))
    metrics = train_policy.train(cfg, str(tmp_path / "run"))
    assert math.isfinite(metrics["loss"]) and metrics["skipped_fraction"] == 0
    folder = train_policy.latest_checkpoint(str(tmp_path / "run"))
    assert folder.endswith("checkpoint-1")
    net = policy.load_policy(folder)
    assert not torch.equal(net.out.weight, torch.zeros_like(net.out.weight))
    state = torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=False)
    assert state["step"] == 1 and state["optimizer"]["state"]


def test_resume_after_a_kill(tmp_path, tiny_llada):
    cfg = small_config(tmp_path, tiny_llada, max_steps=3)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(cfg))
    out = str(tmp_path / "run")
    script = os.path.join(REPO, "scripts", "train_policy.py")
    proc = subprocess.Popen([sys.executable, script, "--config", str(config), "--out", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.isdir(os.path.join(out, "checkpoint-1")) and proc.poll() is None:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    done = subprocess.run([sys.executable, script, "--config", str(config), "--out", out, "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps[-1] == 3 and os.path.isdir(os.path.join(out, "checkpoint-3"))
    assert steps.count(1) == 1  # step 1 was checkpointed before the kill and not run again


@pytest.mark.parametrize("name", ["llada_gsm8k_math_policy.json", "llada_gsm8k_math_policy_bl256.json"])
def test_real_configs_run_one_step_on_a_random_weight_llada(tmp_path, tiny_llada, name):
    cfg = train_policy.load_config(os.path.join(REPO, "configs", name))
    assert cfg["model_path"] == "GSAI-ML/LLaDA-8B-Instruct" and cfg["block_length"] in (32, 256)
    cfg.update(model_path=tiny_llada, train_data="data/tiny_math_train.jsonl", gen_length=8, block_length=4,
               num_generations=2, prompts_per_step=1, max_steps=1)
    metrics = train_policy.train(cfg, str(tmp_path / "run"))
    assert math.isfinite(metrics["loss"]) and metrics["step"] == 1


def test_the_shipped_policy_loads_as_the_default():
    decoder = decoders.build_decoder("policy", 0, {}, {})
    assert decoder.net.config == policy.PolicyConfig() and decoder.sampling_mode == "bernoulli-argmax"


@pytest.mark.parametrize("block", [64, 32])
def test_gpu_configs_run_one_step_on_a_random_weight_llada(tmp_path, tiny_llada, block):
    cfg = train_policy.load_config(os.path.join(REPO, "configs", f"tiny_policy_gpu_bl{block}.json"))
    assert cfg["block_length"] == block and cfg["gen_length"] == 64 and cfg["model_path"] == "models/tiny-llada"
    assert cfg["model_dtype"] == "float32" and cfg["expert_generations"] and cfg["max_minutes"] <= 8
    cfg.update(model_path=tiny_llada, gen_length=8, block_length=block // 16, num_generations=2, prompts_per_step=1,
               max_steps=1)
    metrics = train_policy.train(cfg, str(tmp_path / "run"))
    assert math.isfinite(metrics["loss"]) and metrics["step"] == 1 and "expert_accuracy" in metrics


@pytest.mark.parametrize("key,value", [("model_dtype", "float16"), ("max_minutes", 0)])
def test_bad_dtype_or_time_budget_is_refused(tmp_path, key, value):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ValueError, match="model_dtype is null, float32 or bfloat16; max_minutes is null or > 0"):
        train_policy.load_config(str(path))


@pytest.mark.parametrize("folder, config", [("tiny-policy", "tiny_policy_gpu_bl64.json"),
                                            ("tiny-policy-bl32", "tiny_policy_gpu_bl32.json")])
def test_shipped_policies_come_from_their_configs(folder, config):
    path = os.path.join(REPO, "models", folder)
    log = json.load(open(os.path.join(path, "training_log.json")))
    cfg = train_policy.load_config(os.path.join(REPO, "configs", config))
    assert log["config"] == cfg and log["config"]["train_data"] == "data/tiny_math_train.jsonl"
    assert len(log["steps"]) == cfg["max_steps"] == 600 and log["steps"][-1]["step"] == 600
    assert log["train_seconds"] == pytest.approx(sum(s["seconds"] for s in log["steps"]), abs=0.1)
    assert log["train_seconds"] < 10 * 60  # the GPU budget
    net = policy.load_policy(path)
    assert net.config == train_policy.policy_config(cfg)
    assert sum(p.numel() for p in net.parameters()) == 330754
