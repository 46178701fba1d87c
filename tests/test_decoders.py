"""Decoder zoo: each rule on a scripted model whose logits the test chooses, the registry and
plugins, and every registered decoder end to end under the rule checks on a tiny random model."""
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import custom_demask_eval as cde
from demask import core
from demask import decoders
from demask.settings import RunSettings
from conftest import REPO

V, MASK = 8, 7  # scripted vocabulary: tokens 0..6, mask id 7


class Scripted:
    """A model whose logits are chosen by the test: script(call, x, query_idx) -> [B, Q, V]."""
    device, family, mask_id = torch.device("cpu"), "llada", MASK

    def __init__(self, script):
        self.script, self.calls, self.inputs = script, 0, []

    def __call__(self, x, attention_mask=None, query_idx=None, positions=None):
        self.inputs.append(x.clone())
        logits = self.script(self.calls, x, query_idx)
        self.calls += 1
        return SimpleNamespace(logits=logits)


def peaked(conf, token=0):
    """Logits of distributions with probability conf on `token`, the rest spread over the other
    non-mask tokens; conf: [..., Q]."""
    conf = torch.as_tensor(conf, dtype=torch.float64)
    p = ((1 - conf) / (V - 2))[..., None].expand(*conf.shape, V).clone()
    p[..., token] = conf
    p[..., MASK] = 0.0
    return p.log()


def per_position(values, gen_length=None):
    """A script giving each generation position its own confidence (values[call][pos] or values[pos])."""
    def script(call, x, query_idx):
        row = values[min(call, len(values) - 1)] if isinstance(values[0], (list, tuple)) else values
        P = x.shape[1] - len(row)
        conf = torch.tensor(row, dtype=torch.float64)[query_idx - P]
        return peaked(conf)
    return script


def trace(decoder, script, gen_length, steps, block_length, prompt=(0, 1)):
    """Decode one row; returns (committed positions per forward, re-masked positions per forward, x)."""
    model = Scripted(script)
    x, _ = decoder.decode(model, torch.tensor([list(prompt)]), gen_length, steps, block_length)
    states = [s[0, len(prompt):] for s in model.inputs] + [x[0, len(prompt):]]
    commits = [set((a == MASK).logical_and(b != MASK).nonzero().flatten().tolist()) for a, b in zip(states, states[1:])]
    remasks = [set((a != MASK).logical_and(b == MASK).nonzero().flatten().tolist()) for a, b in zip(states, states[1:])]
    assert not (x == MASK).any()
    return commits, remasks, x


def make(name, **kwargs):
    settings = dict(temperature=0.0, conf_threshold=0.9, kl_threshold=0.01, history_length=2)
    return decoders.build_decoder(name, MASK, settings, kwargs)


# ---------------------------------------------------------------- rules on scripted logits

def test_threshold_commits_exactly_the_positions_above_tau_and_at_least_one():
    conf = [[0.95, 0.5, 0.91, 0.2], [0.3, 0.3, 0.3, 0.3]]
    commits, _, _ = trace(make("threshold", alg_threshold=0.9), per_position(conf), 4, 4, 4)
    assert commits == [{0, 2}, {1}, {3}]  # then nothing above tau: the best (ties: lower position)


def test_factor_rank_rule_without_the_off_by_one():
    # sorted 0.99, 0.9, 0.5 with f = 1: ranks 1 and 2 pass (0.9 >= 1 - 1/3); rank 3 fails
    # (0.5 < 1 - 1/4) and is the last rank: it is not committed (the ports' off-by-one would).
    commits, _, _ = trace(make("factor", alg_factor=1), per_position([0.5, 0.99, 0.9]), 3, 3, 3)
    assert commits == [{1, 2}, {0}]
    commits, _, _ = trace(make("factor", alg_factor=1), per_position([0.99, 0.95, 0.9, 0.6]), 4, 4, 4)
    assert commits[0] == {0, 1, 2}  # 0.9 >= 0.75 passes, 0.6 < 0.8 stops
    commits, _, _ = trace(make("factor", alg_factor=1), per_position([0.3, 0.2]), 2, 2, 2)
    assert commits == [{0}, {1}]  # rank 1 always
    commits, _, _ = trace(make("factor", alg_factor=2.5), per_position([0.3, 0.2]), 2, 2, 2)
    assert commits == [{0, 1}]  # 0.2 >= 1 - 2.5/3


@pytest.mark.parametrize("G,factor,formula,covered,minimal", [
    (256, 1, 22, 253, 23), (256, 2, 32, 272, 31), (256, 4, 45, 276, 44), (256, 8, 64, 288, 60),
    (128, 1, 16, 136, 16), (512, 1, 32, 528, 32)])
def test_pyramidal_steps_table(G, factor, formula, covered, minimal):
    d = decoders.pyramidal_steps(G, factor)
    assert (d["formula_steps"], d["covered"], d["minimal_steps"]) == (formula, covered, minimal)
    assert d["forwards_per_window"] == min(formula, minimal)


def test_pyramidal_commits_growing_k_and_the_rest_at_the_last_step():
    flat = per_position([0.5] * 256)
    commits, _, _ = trace(make("pyramidal", factor=1), flat, 256, 256, 256)
    # the formula's 22 steps cover only 253 of 256 (the minimal S is 23): the 22nd step commits 22 + 3
    assert [len(c) for c in commits] == list(range(1, 22)) + [25]
    commits, _, _ = trace(make("pyramidal", factor=2), flat, 256, 256, 256)
    assert [len(c) for c in commits] == [i // 2 + 1 for i in range(30)] + [16]  # 31 forwards, k clamped
    assert sorted(commits[0] | commits[1]) == [0, 1]  # confidence ties go left to right
    info = make("pyramidal", factor=1).info(256, 256, 64)
    assert info["formula_steps"] == 11 and info["forwards"] == 4 * 11


def test_klass_falls_back_to_the_schedule_when_nothing_is_stable():
    def flipping(call, x, q):  # the top token changes every step: KL stays large
        return peaked(torch.full(q.shape, 0.95), token=call % 2)
    commits, _, _ = trace(make("klass"), flipping, 4, 4, 4)
    assert commits == [{0}, {1}, {2}, {3}]
    stable = per_position([0.95] * 4)
    commits, _, _ = trace(make("klass"), stable, 4, 4, 4)
    assert commits == [{0}, {1}, {2, 3}]  # stable for H = 2 real steps and confident: all ready ones


def test_klass_kl_commits_stable_positions_regardless_of_confidence():
    low = per_position([0.3] * 4)
    commits, _, _ = trace(make("klass"), low, 4, 4, 4)
    assert commits == [{0}, {1}, {2}, {3}]  # conf 0.3 < 0.9: KLASS keeps falling back
    decoder = make("klass_kl")
    assert decoder.conf_threshold == 0.0  # the registry entry wins over the label's conf_threshold
    commits, _, _ = trace(decoder, low, 4, 4, 4)
    assert commits == [{0}, {1}, {2, 3}]


def gap_script(gaps):
    """Every position gets raw logits (gap, 0, -5, ...): top-1 minus top-2 = gaps[call]."""
    def script(call, x, q):
        logits = torch.full((*q.shape, V), -5.0)
        logits[..., 0] = gaps[call]
        logits[..., 1] = 0.0
        return logits
    return script


def test_prophet_commits_the_window_exactly_when_the_gap_passes_its_threshold():
    # steps 16: progress = forwards / 16; tau 7.5 below 0.33, 5.0 below 0.67
    gaps = [1.0, 7.4, 8.0, 5.5, 5.5, 5.5]
    commits, _, _ = trace(make("prophet"), gap_script(gaps), 16, 16, 8)
    assert commits == [{0}, {1}, set(range(2, 8)),  # 7.4 < 7.5, then 8.0 >= 7.5: rest of window 0
                       {8}, {9}, set(range(10, 16))]  # 5.5 < 7.5 at 4/16 and 5/16, >= 5.0 at 6/16
    # a fixed answer region in window 1: window 0 is filled first, window 1 at the next forward
    commits, _, _ = trace(make("prophet", answer_start=12, answer_length=2), gap_script([9.0, 9.0]), 16, 16, 8)
    assert commits == [set(range(8)), set(range(8, 16))]


def entropy_of(c):
    return -(c * math.log(c) + (1 - c) * math.log((1 - c) / (V - 2)))


def test_eb_sampler_commits_the_longest_prefix_within_gamma():
    conf = [0.9, 0.6, 0.99, 0.8, 0.5]
    H = [entropy_of(c) for c in conf]
    order = sorted(range(5), key=lambda i: H[i])  # ascending entropy
    budgets = [sum(H[i] for i in order[:n]) - max(H[i] for i in order[:n]) for n in range(1, 6)]
    gamma = (budgets[2] + budgets[3]) / 2  # the first three fit, the fourth does not
    commits, _, _ = trace(make("eb_sampler", gamma=gamma), per_position(conf), 5, 5, 5)
    assert commits[0] == set(order[:3]) and order[:3] == [2, 0, 3]
    bits = make("eb_sampler", gamma=gamma / math.log(2), gamma_unit="bits")
    assert trace(bits, per_position(conf), 5, 5, 5)[0][0] == set(order[:3])
    assert trace(make("eb_sampler", gamma=0.0), per_position(conf), 5, 5, 5)[0][0] == {2}  # at least one
    assert make("eb_sampler").info(8, 8, 8)["gamma_unit"] == "nats"


def test_dus_dilated_levels_and_one_forward_per_level():
    levels = decoders.dilated_levels(32, 2)
    assert [len(l) for l in levels] == [2, 2, 4, 8, 16]
    assert levels[:3] == [[0, 16], [8, 24], [4, 12, 20, 28]]
    commits, _, _ = trace(make("dus"), per_position([0.5] * 64), 64, 64, 32)
    assert commits == [set(l) for l in levels] + [{p + 32 for p in l} for l in levels]
    assert make("dus").info(64, 64, 32)["forwards"] == 10


def test_scorers_signs():
    # position 0: p = (0.6, 0.4): lower entropy, lower confidence; position 1: (0.7, 0.05 x 6)
    def script(call, x, q):
        logits = torch.full((*q.shape, V), -1e4)
        P = x.shape[1] - 2
        for j, pos in enumerate((q[0] - P).tolist()):
            if pos == 0:
                logits[:, j, 0], logits[:, j, 1] = math.log(0.6), math.log(0.4)
            else:
                logits[:, j, :V - 1] = math.log(0.05)
                logits[:, j, 0] = math.log(0.7)
        return logits
    assert trace(make("entropy_topk"), script, 2, 2, 2)[0][0] == {0}  # -H: lowest entropy first
    assert trace(make("confidence_greedy"), script, 2, 2, 2)[0][0] == {1}
    assert trace(make("topk_margin"), script, 2, 2, 2)[0][0] == {1}  # 0.65 > 0.2
    assert trace(make("left_to_right"), per_position([0.1, 0.9, 0.9]), 3, 3, 3)[0] == [{0}, {1}, {2}]


def test_remdm_remasks_decoded_window_tokens_and_finishes():
    torch.manual_seed(0)
    decoder = make("remdm", eta=1.0)  # sigma = min(1, (1 - alpha_s) / alpha_t) = 1 early in the window
    commits, remasks, _ = trace(decoder, per_position([0.5] * 16), 16, 16, 8)
    assert decoder.remasks and any(remasks)
    assert len(commits) > 16  # each re-mask costs a forward
    for new, again in zip(commits, remasks):
        assert not new & again  # never re-masks what it commits in the same step
        assert {p // 8 for p in again} <= {p // 8 for p in new}  # only in the window being decoded
    conf = make("remdm", sigma="conf")
    commits, remasks, _ = trace(conf, per_position([0.5] * 16), 16, 16, 8)
    assert len(commits) >= 16


# ---------------------------------------------------------------- registry and plugins

def test_registry_entries():
    expected = {"confidence_greedy": "topk", "topk_margin": "topk", "entropy_topk": "topk",
                "random": "topk", "left_to_right": "topk", "klass": "adaptive", "klass_kl": "adaptive",
                "threshold": "threshold", "factor": "factor", "pyramidal": "schedule", "eb_sampler": "adaptive",
                "dus": "schedule", "prophet": "adaptive", "remdm": "remask"}
    for name, kind in expected.items():
        info = decoders.DECODERS[name]
        assert info.method_type == kind and decoders.DECODERS[name][0] is info.cls
    assert decoders.DECODERS["default"].cls is cde.DemaskDecoder
    assert decoders.DECODERS["threshold"].representative_param == "alg_threshold"
    assert decoders.method_position_score("entropy_topk") == "neg_entropy"
    assert decoders.method_position_score("confidence_greedy", {"score": "margin"}) == "margin"
    assert "steps" not in decoders.method_config_keys("threshold") and "alg_threshold" in decoders.method_config_keys("threshold")
    assert "steps" in decoders.method_config_keys("confidence_greedy")
    with pytest.raises(ValueError, match="already registered"):
        decoders.register_method("threshold", decoders.FactorDecoder, method_type="factor")
    with pytest.raises(ValueError, match="method_type"):
        decoders.register_method("x", decoders.TopKDecoder, method_type="bogus")
    with pytest.raises(ValueError, match="unknown score"):
        make("confidence_greedy", score="bogus")


PLUGIN = '''
import torch
import custom_demask_eval as cde


class RightToLeft(cde.TopKDecoder):
    """Commit the rightmost masked positions first."""

    def select(self, logits, candidates, k, step, batch):
        tokens, p, conf = self.propose(logits, batch)
        score = torch.arange(candidates.shape[1], dtype=torch.float64).expand(candidates.shape)
        return cde.top_k_commit(score, candidates, k), tokens


cde.register_method("right_to_left", RightToLeft, method_type="topk", representative_param="k",
                    position_score="position")
'''


def test_plugin_registers_a_decoder_for_the_cli(tmp_path, tiny_llada):
    plugin = tmp_path / "my_decoders.py"
    plugin.write_text(PLUGIN)
    try:
        metrics = cde.main(["--plugin", str(plugin), "--label", "llada-math", "--model_path", tiny_llada,
                            "--decoder", "right_to_left", "--limit", "1", "--gen_length", "4", "--steps", "4",
                            "--block_length", "4", "--results_dir", str(tmp_path / "r")])
        assert metrics["avg_steps"] == 4.0
        (run,) = (tmp_path / "r" / "llada-math").iterdir()
        import json
        cfg = json.load(open(run / "summary.json"))["config"]
        assert cfg["plugins"] == [str(plugin)] and cfg["decoder_info"]["method_type"] == "topk"
    finally:
        decoders.DECODERS.pop("right_to_left", None)
        cde.PLUGIN_FILES.pop("demask_plugin_my_decoders", None)
    # as a script the harness is __main__: the plugin's `import custom_demask_eval` must reach it
    out = subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), "--plugin", str(plugin),
                          "--label", "llada-math", "--decoder", "right_to_left", "--model_path", "/no/such/model"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 2 and "model path '/no/such/model' not found" in out.stderr, out.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(SystemExit) as exit_info:
        cde.main(["--plugin", str(bad), "--label", "llada-math"])
    assert exit_info.value.code == 2


def test_bad_decoder_value_fails_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cde, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cde.main(["--label", "llada-math", "--decoder", "remdm", "--decoder_args", "sigma=loop"])
    assert exit_info.value.code == 2 and "remdm sigma is cap or conf" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end on a tiny random model

STOCHASTIC = {"random", "remdm", "policy"}
# the reference decoders; the editable region is checked against klass (test_trust) and may hold anything
CASES = [(name, {}) for name in decoders.DECODERS if name != "default"] + [("confidence_greedy", {"alg_temp": 0.5}),
                                                 ("remdm", {"sigma": "conf"}), ("prophet", {"answer_start": 10})]


@pytest.fixture(scope="module")
def tiny(tiny_llada):
    return core.load_model(tiny_llada, device="cpu")


@pytest.mark.parametrize("name,args", CASES, ids=[f"{n}{'-' + '-'.join(a) if a else ''}" for n, a in CASES])
def test_every_decoder_end_to_end_batch_of_3_with_left_padding(tiny, name, args):
    samples = [dict(id=f"s/{i}", prompt_ids=p) for i, p in enumerate([[0, 5, 6, 7, 8], [0, 11], [0, 12, 13]])]
    cfg = RunSettings(gen_length=16, steps=8, block_length=8, temperature=0.0, conf_threshold=0.3, kl_threshold=0.5,
               history_length=2)
    if name == "remdm":
        args = dict(args, eta=0.3)
    decoder = decoders.build_decoder(name, tiny.mask_id, cfg, args)
    gens, counted, _ = core.decode_batch(cfg, tiny, decoder, samples, seed=0)  # rule checks inside
    assert all(len(g) == 16 for g in gens)
    if name in STOCHASTIC or args.get("alg_temp"):
        return
    alone = [core.decode_batch(cfg, tiny, decoder, [s], seed=0) for s in samples]
    assert gens == [a[0][0] for a in alone]
    assert counted == [a[1][0] for a in alone]


@pytest.mark.parametrize("name", ["threshold", "eb_sampler", "remdm", "klass"])
def test_dream_style_token_choice(tiny_dream, name):
    model = core.load_model(tiny_dream, device="cpu")
    cfg = RunSettings(gen_length=8, steps=8, block_length=8, temperature=0.5, top_p=0.9)
    decoder = decoders.build_decoder(name, model.mask_id, cfg, {})
    gens, counted, _ = core.decode_batch(cfg, model, decoder, [dict(id="a", prompt_ids=[0, 5]),
                                                              dict(id="b", prompt_ids=[0, 5, 6, 7])], seed=1)
    assert len(gens) == 2 and min(counted) >= 1


def test_remasking_must_be_declared(tiny):
    class Undeclared(decoders.RemdmDecoder):
        remasks = False
    cfg = RunSettings(gen_length=8, steps=8, block_length=8)
    with pytest.raises(core.RuleViolation, match="committed tokens are final"):
        core.decode_batch(cfg, tiny, Undeclared(tiny.mask_id, eta=1.0), [dict(id="a", prompt_ids=[0, 5])], seed=0)
    gens, counted, _ = core.decode_batch(cfg, tiny, decoders.RemdmDecoder(tiny.mask_id, eta=1.0),
                                        [dict(id="a", prompt_ids=[0, 5])], seed=0)
    assert counted[0] > 8 and tiny.mask_id not in gens[0]


def full_sort_top_p(scaled, top_p, sample):
    """Dream's full-vocabulary top-p (decoders.dream_proposal): tokens, confidence, nucleus."""
    tokens, q = decoders.dream_proposal(scaled, 1.0 if sample else 0.0, top_p)
    return tokens, torch.gather(q, -1, tokens[..., None]).squeeze(-1), q


@pytest.mark.parametrize("scale", [4.0, 2.0, 0.01], ids=["16-candidates", "one-row-each-way", "full-sort"])
def test_top_p_without_full_sort_samples_the_same_nucleus(scale, monkeypatch):
    """With candidates (16, 64) of 300: the top 16 suffice at scale 4; at scale 2 one row needs the
    full sort and the other the top 64 (top_p 0.9); at 0.01 both rows are sorted in full."""
    torch.manual_seed(0)
    scaled = (scale * torch.randn(2, 300)).to(torch.float64)
    monkeypatch.setattr(decoders, "TOP_P_CANDIDATES", (16, 64))
    _, _, nucleus = full_sort_top_p(scaled, 0.9, sample=False)
    draws = torch.stack([decoders.top_p_tokens(scaled, 0.9, sample=True)[0] for _ in range(4000)])
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=300).double() / len(draws)
        assert (freq[nucleus[row] == 0] == 0).all()  # nothing outside the nucleus is ever drawn
        assert (freq - nucleus[row]).abs().max() < 0.03
    tokens, conf = decoders.top_p_tokens(scaled, 0.9, sample=True)
    assert torch.allclose(conf, nucleus.gather(-1, tokens[:, None]).squeeze(-1), rtol=1e-9, atol=0)
    greedy, greedy_conf = decoders.top_p_tokens(scaled, 0.9, sample=False)
    old_tokens, old_conf, _ = full_sort_top_p(scaled, 0.9, sample=False)
    assert torch.equal(greedy, old_tokens) and torch.allclose(greedy_conf, old_conf, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(set(n for n, _ in CASES)))
def test_dream_greedy_top_p_decoding_unchanged_by_the_partial_sort(tiny_dream, name, monkeypatch):
    """At temperature 0 the partial-sort top-p gives the generations and counts of the full sort."""
    model = core.load_model(tiny_dream, device="cpu")
    cfg = RunSettings(gen_length=16, steps=16, block_length=8, temperature=0.0, top_p=0.95, conf_threshold=0.3,
               kl_threshold=0.5, history_length=2)
    samples = [dict(id="a", prompt_ids=[0, 5]), dict(id="b", prompt_ids=[0, 5, 6, 7])]
    runs = []
    for top_p in (decoders.top_p_tokens, lambda s, p, sample: full_sort_top_p(s, p, sample)[:2]):
        monkeypatch.setattr(decoders, "top_p_tokens", top_p)
        decoder = decoders.build_decoder(name, model.mask_id, cfg, {"eta": 0.3} if name == "remdm" else {})
        runs.append(core.decode_batch(cfg, model, decoder, samples, seed=3))
    assert runs[0] == runs[1]
