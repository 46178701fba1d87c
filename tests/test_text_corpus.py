"""The SmolLM2 training corpus of the bundled model and how train_tiny.py turns text into examples."""
import gzip
import json
import os
import random
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import make_text_corpus  # noqa: E402
import train_tiny  # noqa: E402

SPECIAL = {"bos_token_id": 1, "eos_token_id": 0}


def test_sampling_chain_keeps_top_k_then_top_p_then_min_p():
    # probabilities 0.7, 0.2, 0.04, 0.03, 0.02, 0.01: top-p 0.95 keeps the first four (the mass
    # before the fourth is 0.94, before the fifth 0.97), min-p 0.05 * 0.7 = 0.035 then drops 0.03
    probs = torch.tensor([0.7, 0.2, 0.04, 0.03, 0.02, 0.01])
    logits = torch.full((1, 100), -1e9)
    logits[0, 10:16] = probs.log()
    draws = torch.cat([make_text_corpus.sample_next(logits, torch.Generator().manual_seed(s)) for s in range(400)])
    assert set(draws.flatten().tolist()) == {10, 11, 12}
    # temperature 0.8 sharpens the kept ones: p ** 1.25, renormalised
    kept = probs[:3] ** (1 / 0.8)
    assert abs((draws == 10).float().mean().item() - (kept[0] / kept.sum()).item()) < 0.06


def test_finish_drops_short_duplicate_and_test_overlapping_documents():
    test = json.loads(open(os.path.join(REPO, "data", "tiny_text_test.jsonl")).readline())
    words = " ".join(f"word{i}" for i in range(30)) + "."
    rows = [dict(prompt="p", smollm2_tokens=40, text=words),
            dict(prompt="p", smollm2_tokens=40, text=words),
            dict(prompt="p", smollm2_tokens=3, text="Too short."),
            dict(prompt="p", smollm2_tokens=40, text="Some words first. " + test["prefix"] + test["reference"] + " end.")]
    kept, dropped = make_text_corpus.finish(rows)
    assert [r["text"] for r in kept] == [words]
    assert dropped == {"empty": 1, "duplicate": 1, "test overlap": 1}


def test_shipped_corpus_has_no_span_of_a_test_document():
    pieces, spans = make_text_corpus.test_spans()
    with gzip.open(os.path.join(REPO, "data", "tiny_text_corpus.jsonl.gz"), "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert len(docs) == len(set(docs)) > 6000
    for text in docs:
        words = text.split()
        n = make_text_corpus.OVERLAP_WORDS
        assert not any(" ".join(words[i:i + n]) in spans for i in range(len(words) - n + 1))
        assert not any(p in text for p in pieces)


def test_text_examples_are_continuations_and_fully_maskable_raw_windows():
    doc = list(range(100, 180))
    text, raw = train_tiny.text_examples([doc], SPECIAL, random.Random(0))
    assert len(text) == train_tiny.TEXT_CUTS and len(raw) == train_tiny.RAW_WINDOWS
    for prompt, answer in text:
        cut = len(prompt) - 1
        assert prompt == [1] + doc[:cut] and train_tiny.TEXT_PREFIX[0] <= cut <= train_tiny.TEXT_PREFIX[1]
        assert answer == doc[cut:cut + 48]
    for prompt, answer in raw:
        assert prompt == [1] and len(answer) == 64
        start = doc.index(answer[0])
        assert answer == doc[start:start + 64]
    short = list(range(100, 120))   # a document shorter than a window ends in <|endoftext|> padding
    _, raw = train_tiny.text_examples([short], SPECIAL, random.Random(0))
    assert all(answer == short + [0] * 44 for _, answer in raw)


def test_task_share_names_every_kind_once():
    assert train_tiny.parse_share(train_tiny.TASK_SHARE) == {"math": 0.6, "code": 0.18, "text": 0.13, "raw": 0.09}
    for bad in ("math:0.5,code:0.5", "math:0.6,code:0.18,text:0.13,raw:-1"):
        with pytest.raises(SystemExit):
            train_tiny.parse_share(bad)
