"""The calibrated and early-exit decoders (demask/calibrated.py): parity with the authors' code on
recorded outputs (tests/fixtures/*_upstream.json), each rule on hand-computed cases, the SchED
schedules, batches."""
import json
import math
import os

import pytest
import torch

import custom_demask_eval as cde
from demask import calibrated, core, decoders
from conftest import FIXTURES
from test_decoders import make, peaked, per_position, trace


def fixture(name):
    with open(os.path.join(FIXTURES, f"{name}_upstream.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny():
    return core.load_model(cde.TINY, device="cpu")


def run_of(data):
    return cde.LABELS["tiny-math"].replace(gen_length=data["gen_length"], steps=data["steps"],
                                           block_length=data["block_length"])


def decode_all(lm, name, data, decoder_args, traces=None, n=50):
    """Our decoder on the fixture's first n prompts as one batch (upstream decoded them one at a time)."""
    run = run_of(data)
    decoder = decoders.build_decoder(name, lm.mask_id, run, decoder_args)
    samples = [dict(id=p["id"], prompt_ids=p["prompt_ids"]) for p in data["prompts"][:n]]
    gens, counted, _ = core.decode_batch(run, lm, decoder, samples, seed=0, traces=traces)
    return gens, counted

# ---------------------------------------------------------------- parity with the authors' code


@pytest.mark.parametrize("name,run,n", [("pc_sampler", 0, 50), ("pc_sampler", 1, 20), ("localleap", 0, 50),
                                        ("localleap", 1, 50), ("credit", 0, 50), ("credit", 1, 50)])
def test_same_tokens_and_forwards_as_upstream(tiny, name, run, n):
    """pc_sampler's second setting on 20 prompts only (64 forwards each; all 50 match too)."""
    data = fixture(name)
    assert len(data["prompts"]) == 50 and data["mask_id"] == tiny.mask_id
    recorded = data["runs"][run]
    gens, counted = decode_all(tiny, name, data, recorded["decoder_args"], n=n)
    assert gens == recorded["tokens"][:n]
    assert counted == recorded["forwards"][:n]


def dinfer_engine(tokens, commit_step, block, eos, unroll=4, tokens_per_forward=8):
    """What dInfer's BlockWiseDiffusionLLM makes of our decode (tokens, trace commit steps): per block it
    runs max(min(masks // 8, 4), 1) forwards before it looks at the masks again (the forwards after the
    block is full change nothing), and it stops after the first block that holds EOS, filling the rest
    with EOS (early_stop). Returns (tokens, forwards)."""
    forwards, start = 0, 0
    for b in range(0, len(tokens), block):
        steps = commit_step[b:b + block]
        f, left = start, block
        while left:
            group = max(min(left // tokens_per_forward, unroll), 1)
            forwards, f = forwards + group, f + group
            left = sum(s >= f for s in steps)
        start = max(steps) + 1
        if eos in tokens[b:b + block]:
            return tokens[:b + block] + [eos] * (len(tokens) - b - block), forwards
    return tokens, forwards


def test_credit_against_dinfer_engine_defaults(tiny):
    """dInfer's own engine settings differ from ours only by its loop: unrolled forwards and the EOS stop."""
    data = fixture("credit")
    recorded = data["runs"][2]
    assert recorded["upstream_args"]["engine"] == dict(early_stop=True, maximum_unroll=4, expected_tpf=8)
    traces = []
    gens, counted = decode_all(tiny, "credit", data, recorded["decoder_args"], traces)
    emulated = [dinfer_engine(g, t["commit_step"], data["block_length"], recorded["upstream_args"]["eos_id"])
                for g, t in zip(gens, traces)]
    assert [e[0] for e in emulated] == recorded["tokens"]
    assert [e[1] for e in emulated] == recorded["forwards"]
    assert sum(recorded["forwards"]) == 402 and sum(counted) == 230  # 8.04 vs 4.60 forwards per prompt


def test_pc_sampler_prior_is_upstreams_count(tiny):
    """The "data" prior counts the reference corpus as PC-Sampler's calculate_p_baseline.py does."""
    prior = fixture("pc_sampler")["upstream_prior"]
    counts, total = calibrated.corpus_counts(tiny.tokenizer)
    assert total == prior["num_token"] == 3357656
    assert counts == {int(k): v for k, v in prior["counts"].items()}

# ---------------------------------------------------------------- rules on hand-computed cases


def test_pc_sampler_position_decay_and_clip():
    # uniform prior (no tokenizer): salience = c ln 8; scores c * e^(-decay i)
    conf = per_position([0.5, 0.9, 0.95])
    assert trace(make("pc_sampler"), conf, 3, 3, 3)[0] == [{1}, {2}, {0}]  # 0.5, 0.701, 0.576
    assert trace(make("pc_sampler", decay=0.0), conf, 3, 3, 3)[0] == [{2}, {1}, {0}]
    # alpha 1: every salience (1.04, 1.87, 1.98) is clipped to 1, the decay alone orders
    assert trace(make("pc_sampler", alpha=1.0), conf, 3, 3, 3)[0] == [{0}, {1}, {2}]
    # alpha 1.5: 1.04, 1.5 e^-0.25 = 1.168, 1.5 e^-0.5 = 0.910
    assert trace(make("pc_sampler", alpha=1.5), conf, 3, 3, 3)[0] == [{1}, {0}, {2}]


def test_pc_sampler_prior_file(tmp_path):
    path = tmp_path / "prior.json"
    path.write_text(json.dumps({"num_token": 10, "p_baseline_dict": {"1": 4, "3": 6}}))
    prior = calibrated.token_prior(str(path), None, 5)
    assert prior.tolist() == [0.1, 0.4, 0.1, 0.6, 0.1]  # unseen ids: 1 / num_token
    assert calibrated.token_prior("data", None, 4).tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="pc_sampler prior"):
        make("pc_sampler", prior=str(tmp_path / "missing.json"))


def test_localleap_relaxes_only_near_anchors():
    conf = [[0.95, 0.80, 0.50, 0.80, 0.70, 0.80, 0.80, 0.80],  # anchor 0: 1 and 2 near, 1 passes 0.75
            [0.0, 0.0, 0.50, 0.80, 0.70, 0.92, 0.76, 0.74],    # anchor 5: 3..7 near; 3, 6 pass, 4, 7 do not
            [0.0, 0.0, 0.50, 0.0, 0.70, 0.0, 0.0, 0.74],       # no anchor: threshold 0.9, only the best
            [0.0, 0.0, 0.50, 0.0, 0.70, 0.0, 0.0, 0.0]]
    commits, _, _ = trace(make("localleap", radius=2), per_position(conf), 8, 8, 8)
    assert commits == [{0, 1}, {3, 5, 6}, {7}, {4}, {2}]
    commits, _, _ = trace(make("threshold"), per_position(conf), 8, 8, 8)
    assert commits[:2] == [{0}, {5}]  # without the relaxation


def credit_conf(c, forwards, alpha=0.7, gamma=0.2, beta=0.8):
    """Confidence of a position whose top-1 probability c stays on one token, after `forwards` forwards:
    credit C = c^gamma (1 + beta + ... + beta^(n-1)); the fused top-1 probability c (1+C)^a / (c (1+C)^a + 1 - c)."""
    credit = c ** gamma * sum(beta ** j for j in range(forwards))
    boosted = c * (1 + credit) ** alpha
    return boosted / (boosted + 1 - c)


def test_credit_lets_steady_positions_pass_the_threshold_together():
    conf = [0.85, 0.84, 0.80, 0.797]
    fused = [[credit_conf(c, n) for c in conf] for n in (1, 2, 3)]
    assert fused[0][0] > 0.9 > fused[0][1]  # forward 1: 0.9010 commits; 0.8939, 0.8648, 0.8574 wait
    assert fused[1][1] > 0.9 > fused[1][2] > fused[1][3]  # forward 2: 0.9140; 0.8896, 0.8878 wait
    assert min(fused[2][2:]) > 0.9  # forward 3: 0.9028 and 0.9012 pass together
    commits, _, _ = trace(make("credit"), per_position(conf), 4, 4, 4)
    assert commits == [{0}, {1}, {2, 3}]
    commits, _, _ = trace(make("threshold"), per_position(conf), 4, 4, 4)
    assert commits == [{0}, {1}, {2}, {3}]  # without credit: one per forward


def test_credit_commits_positions_within_1e5_of_the_best_and_resets_per_window():
    commits, _, _ = trace(make("credit"), per_position([0.6, 0.6, 0.3, 0.5, 0.6, 0.6, 0.6, 0.6]), 8, 8, 4)
    assert commits[0] == {0, 1}  # tied at the best: both are >= max - 1e-5
    decoder = make("credit")
    batch = type("Batch", (), {})()
    decoder.start(batch)
    logits = peaked(torch.tensor([[0.8, 0.8]]))
    candidates = torch.ones(1, 2, dtype=torch.bool)
    for step in (0, 1, 2):
        decoder.fuse(logits, candidates, torch.tensor([step]), batch)
    assert batch.credit[0, 0, 0].item() == pytest.approx(0.8 ** 0.2 * (1 + 0.8 + 0.64), rel=1e-6)
    decoder.fuse(logits, candidates, torch.tensor([0]), batch)  # a new window starts from zero
    assert batch.credit[0, 0, 0].item() == pytest.approx(0.8 ** 0.2, rel=1e-6)


def test_sched_threshold_schedules():
    p = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5], dtype=torch.float64)
    linear = calibrated.sched_threshold(p, 7.5, 2.5, "linear", 4.0)
    cosine = calibrated.sched_threshold(p, 7.5, 2.5, "cosine", 4.0)
    exp = calibrated.sched_threshold(p, 7.5, 2.5, "exp", 4.0)
    assert linear.tolist() == pytest.approx([7.5, 6.25, 5.0, 2.5, 2.5])  # progress is clamped to 1
    assert cosine.tolist() == pytest.approx([7.5, 2.5 + 5 * (1 + math.cos(math.pi / 4)) / 2, 5.0, 2.5, 2.5])
    assert exp.tolist() == pytest.approx([7.5, 2.5 + 5 / math.e, 2.5 + 5 * math.exp(-2), 2.5 + 5 * math.exp(-4),
                                          2.5 + 5 * math.exp(-4)])
    with pytest.raises(ValueError, match="sched"):
        make("sched", schedule="step")


def margin_script(gaps, region_gaps=None):
    """Raw logits (g, 0, -5, ...) at every position: top-1 minus top-2 = gaps[call], or per position
    region_gaps[call][position]."""
    def script(call, x, q):
        P = x.shape[1] - 16
        if region_gaps is None:
            g = torch.full(q.shape, float(gaps[call]))
        else:
            g = torch.tensor(region_gaps[call], dtype=torch.float32)[q - P]
        logits = torch.full((*q.shape, 8), -5.0)
        logits[..., 0] = g
        logits[..., 1] = 0.0
        return logits
    return script


def test_sched_exits_when_the_margin_reaches_the_falling_threshold():
    # exp, k 4, steps 16: tau = 6.39, 5.53, 4.86 at forwards 1, 2, 3
    commits, _, _ = trace(make("sched"), margin_script([1.0, 5.0, 5.0, 0.0]), 16, 16, 8)
    assert commits == [{0}, {1}, set(range(2, 8)), set(range(8, 16))]  # exit at 3, then window 1 whole
    # linear: 7.19, 6.88, 6.56 ... 5.0 at forward 8: 5.0 exits only there
    commits, _, _ = trace(make("sched", schedule="linear"), margin_script([5.0] * 9), 16, 16, 8)
    assert [len(c) for c in commits] == [1] * 7 + [1, 8]  # forward 8 fills window 0's last mask, 9 window 1


def test_sched_margin_is_the_mean_over_the_whole_generation():
    # masked window 0 has margin 10, window 1 margin 0: the mean 5 < 6.39; window 0's own margin would exit
    region = [[10.0] * 8 + [0.0] * 8] * 20
    commits, _, _ = trace(make("sched"), margin_script(None, region), 16, 16, 8)
    assert commits[0] == {0} and commits[1] == {1}  # 5 < 6.39, 5 < 5.53; forward 3: 5 >= 4.86 exits
    assert commits[2] == set(range(2, 8))

# ---------------------------------------------------------------- batches and registry


@pytest.mark.parametrize("name", ["pc_sampler", "localleap", "credit", "sched"])
def test_batch_of_four_equals_one_at_a_time(tiny, name):
    data = fixture("localleap")
    run = run_of(data).replace(steps=16)  # sched's progress t / T moves faster
    decoder = decoders.build_decoder(name, tiny.mask_id, run, {})
    samples = [dict(id=p["id"], prompt_ids=p["prompt_ids"]) for p in data["prompts"][:4]]
    together = core.decode_batch(run, tiny, decoder, samples, seed=0)
    alone = [core.decode_batch(run, tiny, decoder, [s], seed=0) for s in samples]
    assert together[0] == [a[0][0] for a in alone] and together[1] == [a[1][0] for a in alone]


def test_registry_entries():
    expected = {"pc_sampler": "topk", "localleap": "threshold", "credit": "threshold", "sched": "adaptive"}
    for name, kind in expected.items():
        info = decoders.DECODERS[name]
        assert info.method_type == kind and info.cls.__module__ == "demask.calibrated"
        assert not getattr(info.cls, "remasks", False) and info.cls.batched
    assert "steps" not in decoders.method_config_keys("localleap")
    assert "steps" in decoders.method_config_keys("sched") and "steps" in decoders.method_config_keys("pc_sampler")
    with pytest.raises(ValueError, match="relaxed_threshold"):
        make("localleap", relaxed_threshold=1.5)
