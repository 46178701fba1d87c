"""WINO, Saber and FreeDave (demask/verifying.py): each rule on scripted logits, batch independence,
parity with the authors' code run on the bundled tiny model (tests/fixtures/*_upstream.json, sources
inside), and FreeDave's equality with one-token-per-step decoding on every tiny-math and tiny-code
problem."""
import json
import os

import pytest
import torch

import custom_demask_eval as cde
from conftest import FIXTURES
from demask import core, decoders, verifying
from demask.tasks import TASKS, encode_prompt
from test_decoders import MASK, V, make, per_position, trace


@pytest.fixture(scope="module")
def tiny():
    return core.load_model(cde.TINY, device="cpu")


def fixture(name):
    with open(os.path.join(FIXTURES, f"{name}_upstream.json")) as f:
        return json.load(f)


def label_samples(lm, label, limit=None):
    run = cde.LABELS[label]
    return run, [dict(id=s["id"], prompt_ids=encode_prompt(lm, s)) for s in TASKS[run.task]().load(run)[:limit]]


def decode_all(lm, run, decoder, samples, batch=25):
    """[(generation, counted forwards, upstream calls or None)] per sample, in order."""
    out = []
    for i in range(0, len(samples), batch):
        gens, counted, _ = core.decode_batch(run, lm, decoder, samples[i:i + batch], seed=0)
        calls = getattr(decoder, "last_calls", None) or [None] * len(gens)
        out += list(zip(gens, counted, calls))
    return out


def by_id(rows, samples):
    index = {r["id"]: r for r in rows}
    return [index[s["id"]] for s in samples]


# ---------------------------------------------------------------- WINO on scripted logits

def test_wino_drafts_above_threshold_capped_and_at_least_one():
    commits, remasks, _ = trace(make("wino"), per_position([0.95, 0.5, 0.7, 0.2]), 4, 4, 4)
    assert commits[0] == {0, 2} and not any(remasks)
    commits, _, _ = trace(make("wino"), per_position([0.99] * 10), 10, 10, 10)
    assert commits[0] == set(range(7))  # min(max(int(0.7 * 10), 5), 20) = 7, ties to the left
    assert verifying.wino_accept_cap(torch.tensor([10, 4, 30, 100])).tolist() == [7, 5, 20, 20]
    commits, _, _ = trace(make("wino"), per_position([0.3, 0.5, 0.2]), 3, 3, 3)
    assert commits == [{1}, {0}, {2}]  # nothing above 0.6: the most confident


def test_wino_revokes_written_tokens_below_threshold_back_when_it_drafted_several():
    script = per_position([[0.95, 0.95, 0.3, 0.3], [0.5, 0.95, 0.95, 0.95], [0.95] * 4])
    commits, remasks, _ = trace(make("wino"), script, 4, 4, 4)
    assert commits == [{0, 1}, {2, 3}, {0}] and remasks == [set(), {0}, set()]
    one_draft = per_position([[0.95, 0.95, 0.3, 0.3], [0.5, 0.95, 0.95, 0.3], [0.95] * 4])
    _, remasks, _ = trace(make("wino"), one_draft, 4, 4, 4)
    assert not any(remasks)  # a forward that drafts one token verifies nothing


def test_wino_revokes_at_most_one_less_than_the_last_draft():
    script = per_position([[0.95, 0.95, 0.3, 0.3, 0.3, 0.3], [0.5, 0.4, 0.95, 0.95, 0.3, 0.3], [0.95] * 6])
    commits, remasks, _ = trace(make("wino"), script, 6, 6, 6)
    assert commits[:2] == [{0, 1}, {2, 3}]
    assert remasks[1] == {1}  # two below 0.9 >= the 2 drafted before: only 2 - 1, the least probable


# ---------------------------------------------------------------- Saber on scripted logits

def test_saber_commits_above_the_mean_commit_confidence_and_backtracks():
    script = per_position([[0.9, 0.8, 0.7, 0.6], [0.9, 0.84, 0.95, 0.6], [0.99, 0.99, 0.99, 0.97]])
    commits, remasks, _ = trace(make("saber"), script, 4, 4, 4)
    # forward 1: no commit yet (mean 1): the top n = 2, {0, 1}; the lowest change since "0" is 1's: re-masked
    # forward 2: mean 0.85, only 2 is above: top 2 = {2, 1}; changes 0: 0, 1: 0.04, 2: 0.25: 0 re-masked
    # forward 3: mean of 0.9, 0.84, 0.95 = 0.897; 0 and 3 above, the window is full: nothing re-masked
    assert commits == [{0}, {1, 2}, {0, 3}] and remasks == [set(), {0}, set()]


def test_saber_backtracks_only_in_the_current_window_and_not_at_its_first_forward():
    rest = [0.5] * 4
    script = per_position([[0.9, 0.8, 0.7, 0.6] + rest, [0.9, 0.84, 0.95, 0.6] + rest, [0.99, 0.99, 0.99, 0.97] + rest,
                           [0.99] * 4 + [0.99, 0.98, 0.3, 0.2], [0.99] * 8])
    commits, remasks, _ = trace(make("saber"), script, 8, 8, 4)
    # window 1 as in the test above; forward 4 enters window 2 (mean 0.9375): 4 and 5 are above it, and no
    # position of window 2 has a previous confidence, so nothing is re-masked (upstream re-masks in window 1)
    assert commits == [{0}, {1, 2}, {0, 3}, {4, 5}, {6, 7}]
    assert remasks == [set(), {0}, set(), set(), set()]


# ---------------------------------------------------------------- FreeDave on scripted logits

def state_script(token_of=None):
    """Confidence 0.9 at the first generation position, 0.1 less at each next one (the leftmost mask is
    the most confident); the proposed token at position i is token_of(i, positions written), else 0."""
    def script(call, x, query_idx):
        gen_length = 4
        pos = query_idx - (x.shape[1] - gen_length)
        written = (x[:, -gen_length:] != MASK).sum(1, keepdim=True).expand_as(pos)
        tokens = torch.zeros_like(pos) if token_of is None else token_of(pos, written)
        conf = 0.9 - 0.1 * pos.double()
        p = ((1 - conf) / (V - 2))[..., None].expand(*conf.shape, V).clone()
        p.scatter_(-1, tokens[..., None], conf[..., None])
        p[..., MASK] = 0.0
        return p.log()
    return script


def test_freedave_accepts_every_draft_when_the_proposals_do_not_change():
    decoder = make("freedave")
    commits, _, x = trace(decoder, state_script(), 4, 4, 4)
    greedy_commits, _, greedy_x = trace(make("confidence_greedy"), state_script(), 4, 4, 4)
    assert torch.equal(x, greedy_x) and greedy_commits == [{0}, {1}, {2}, {3}]
    assert len(commits) == 4 and decoder.last_calls == [2]  # forwards: the state, then drafts 1..3 in one call


def test_freedave_rejects_drafts_whose_token_changes_and_still_equals_greedy():
    changing = state_script(lambda pos, written: written % 6)
    decoder = make("freedave")
    commits, remasks, x = trace(decoder, changing, 4, 4, 4)
    _, _, greedy_x = trace(make("confidence_greedy"), changing, 4, 4, 4)
    assert torch.equal(x, greedy_x) and x[0, 2:].tolist() == [0, 1, 2, 3]
    # rounds of 3, 2 and 1 drafts after the first forward (a draft with no mask left is not evaluated),
    # each accepting its first draft; the last mask is written without a forward
    assert len(commits) == 1 + 3 + 2 + 1 and decoder.last_calls == [4] and any(remasks)


def test_freedave_with_one_draft_is_one_token_per_step():
    decoder = make("freedave", draft_steps=1)
    commits, remasks, _ = trace(decoder, state_script(lambda pos, written: written % 6), 4, 4, 4)
    assert commits == [{0}, {1}, {2}, {3}] and not any(remasks)
    with pytest.raises(ValueError, match="draft_steps=5 must be >= 1 and <= 4"):
        make("freedave", draft_steps=5)


# ---------------------------------------------------------------- batches on the bundled model

@pytest.mark.parametrize("name", ["wino", "saber", "freedave"])
@pytest.mark.parametrize("label", ["tiny-math", "tiny-code"])
def test_batch_of_four_equals_each_row_alone(tiny, name, label):
    run, samples = label_samples(tiny, label, 4)  # prompts of different lengths: left padding
    decoder = decoders.build_decoder(name, tiny.mask_id, run, {})
    together = decode_all(tiny, run, decoder, samples, batch=4)
    alone = decode_all(tiny, run, decoder, samples, batch=1)
    assert together == alone


# ---------------------------------------------------------------- parity with the authors' code

def test_wino_equals_upstream_with_the_verification_it_can_see(tiny):
    """Upstream's code with each shadow row answered by its position in a plain forward gives our tokens
    and forwards on all 50 prompts; unmodified upstream gives them too when nothing is revoked. Against
    unmodified upstream with revocation, only the verification's context differs."""
    data = fixture("wino")
    run, samples = label_samples(tiny, "tiny-math", 50)
    for name, back in (("visible", 0.9), ("no_revoke", 0.0)):
        expected = by_id(data["runs"][name]["rows"], samples)
        ours = decode_all(tiny, run, decoders.build_decoder("wino", tiny.mask_id, run, dict(threshold_back=back)),
                          samples)
        assert [(g, n) for g, n, _ in ours] == [(r["tokens"], r["forwards"]) for r in expected], name
    shadow = by_id(data["runs"]["shadow"]["rows"], samples)
    visible = by_id(data["runs"]["visible"]["rows"], samples)
    assert 0 < sum(s["tokens"] != v["tokens"] for s, v in zip(shadow, visible)) < len(samples)


@pytest.mark.parametrize("label", ["tiny-code", "tiny-math"])
def test_saber_equals_upstream_in_one_window(tiny, label):
    """Saber's setting (block_length = gen_length): upstream with lower-position ties gives our tokens and
    forwards on all 50 prompts; unmodified upstream differs exactly where its own tie order does."""
    data = fixture("saber")["one_window"]
    run, samples = label_samples(tiny, label, 50)
    run = run.replace(block_length=data["block_length"])
    ours = [(g, n) for g, n, _ in decode_all(tiny, run, decoders.build_decoder("saber", tiny.mask_id, run, {}),
                                             samples)]
    runs = data["runs"][label]
    lower = [(r["tokens"], r["forwards"]) for r in by_id(runs["upstream_lower_ties"], samples)]
    plain = [(r["tokens"], r["forwards"]) for r in by_id(runs["upstream"], samples)]
    assert ours == lower
    assert [o != p for o, p in zip(ours, plain)] == [t != p for t, p in zip(lower, plain)]


def test_saber_first_window_equals_upstream_with_two_windows(tiny, monkeypatch):
    """With the label's two windows our first window is upstream's (lower-position ties): the same
    forwards until it is full and the same generation then; the rest differs (upstream re-masks
    tokens of the first window while decoding the second)."""
    data = fixture("saber")["two_windows"]
    run, samples = label_samples(tiny, "tiny-code", 50)
    assert run.block_length == data["block_length"]
    inputs = []
    forward = tiny.logits
    monkeypatch.setattr(tiny, "logits", lambda x, *a, **k: inputs.append(x[0, -run.gen_length:].tolist())
                        or forward(x, *a, **k))
    decoder = decoders.build_decoder("saber", tiny.mask_id, run, {})
    for sample, expected in zip(samples, by_id(data["rows"], samples)):
        inputs.clear()
        core.decode_batch(run, tiny, decoder, [sample], seed=0)
        first = next(i for i, gen in enumerate(inputs) if tiny.mask_id not in gen[:run.block_length])
        assert (first, inputs[first]) == (expected["first_window_forwards"], expected["first_window_tokens"])


def test_freedave_equals_upstream(tiny):
    """Upstream's tokens (float32, its own tie order) equal ours and its one-token-per-step decoding on
    all 50 prompts; with float64 confidences and lower-position ties its model calls are our
    `last_calls` and its sequences with a mask our counted forwards."""
    data = fixture("freedave")
    run, samples = label_samples(tiny, "tiny-math", 50)
    ours = decode_all(tiny, run, decoders.build_decoder("freedave", tiny.mask_id, run, {}), samples)
    plain = by_id(data["runs"]["float32"]["rows"], samples)
    exact = by_id(data["runs"]["float64_lower_ties"]["rows"], samples)
    assert [g for g, _, _ in ours] == [r["tokens"] for r in plain] == [r["one_per_step_tokens"] for r in plain]
    assert [(n, c) for _, n, c in ours] == [(r["rows_with_mask"], r["calls"]) for r in exact]


# ---------------------------------------------------------------- FreeDave = one token per step, everywhere

@pytest.mark.parametrize("label", ["tiny-math", "tiny-code"])
def test_freedave_equals_one_token_per_step_on_every_problem(tiny, label):
    """FreeDave's claim: the generation of one-token-per-step decoding (confidence top-1 per forward,
    window by window: confidence_greedy with steps = gen_length). Counted as the harness counts (one
    forward per state evaluated) it spends more forwards, in fewer model calls."""
    run, samples = label_samples(tiny, label)
    run = run.replace(steps=run.gen_length)
    greedy = decode_all(tiny, run, decoders.build_decoder("confidence_greedy", tiny.mask_id, run, {}), samples, 16)
    freedave = decode_all(tiny, run, decoders.build_decoder("freedave", tiny.mask_id, run, {}), samples, 16)
    assert [g for g, _, _ in freedave] == [g for g, _, _ in greedy]
    greedy_forwards, forwards, calls = (sum(n for _, n, _ in greedy), sum(n for _, n, _ in freedave),
                                        sum(c for _, _, c in freedave))
    print(f"{label}: {len(samples)} problems, one token per step {greedy_forwards} forwards, FreeDave "
          f"{forwards} forwards in {calls} model calls")
    assert greedy_forwards == len(samples) * run.gen_length
    assert calls < greedy_forwards < forwards
