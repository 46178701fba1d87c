"""Fast checks of the tiny tasks' data and the tiny-llada tokenizer
(built by scripts/make_tiny_data.py)."""
import json
import os
import random
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("TINY_DATA_DIR", ROOT / "data"))          # overrides for dry runs
TOK_DIR = Path(os.environ.get("TINY_TOKENIZER_DIR", ROOT / "models" / "tiny-llada"))
LLADA_CONFIG = ROOT / "tests" / "fixtures" / "model_files" / "llada-8b-instruct" / "tokenizer_config.json"
MATH_SYSTEM = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, "
    "and when you're ready to answer, please use the format 'The final answer is'."
)
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.$")


def load(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def math():
    return load("tiny_math_train.jsonl"), load("tiny_math_test.jsonl")


@pytest.fixture(scope="module")
def code():
    return load("tiny_code_train.jsonl"), load("tiny_code_test.jsonl")


@pytest.fixture(scope="module")
def text():
    return load("tiny_text_train.jsonl"), load("tiny_text_test.jsonl")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOK_DIR))


@pytest.fixture(scope="module")
def special_ids():
    with open(TOK_DIR / "special_ids.json") as f:
        return json.load(f)


# --------------------------------------------------------------------------- sizes / fields

def test_sizes_and_fields(math, code, text):
    (mtr, mte), (ctr, cte), (ttr, tte) = math, code, text
    assert len(mte) == 500 and len(mtr) >= 30_000
    assert len(cte) == 200 and len(ctr) >= 5_000
    assert len(tte) == 200 and len(ttr) >= 50
    assert all({"id", "problem", "solution", "answer"} <= r.keys() for r in mtr + mte)
    he = {"task_id", "prompt", "entry_point", "canonical_solution", "test"}
    assert all(he <= r.keys() for r in cte)
    assert all((he | {"completion"}) <= r.keys() for r in ctr)
    assert all({"prefix", "reference"} <= r.keys() for r in tte)
    assert all("text" in r for r in ttr)
    for rows, key in [(mtr + mte, "id"), (ctr + cte, "task_id"), (ttr + tte, "id")]:
        ids = [r[key] for r in rows]
        assert len(ids) == len(set(ids))
    assert all(r["task_id"].startswith("TinyCode/") for r in cte)


def test_committed_data_is_small():
    total = sum(p.stat().st_size for p in DATA.glob("tiny_*.jsonl"))
    assert total < 16e6, total


# --------------------------------------------------------------------------- disjoint splits

def test_splits_disjoint(math, code, text):
    (mtr, mte), (ctr, cte), (ttr, tte) = math, code, text
    assert not {r["problem"] for r in mtr} & {r["problem"] for r in mte}
    assert not {r["prompt"] for r in ctr} & {r["prompt"] for r in cte}
    assert not {r["source_id"] for r in ttr} & {r["source_id"] for r in tte}
    train_texts = [r["text"] for r in ttr]
    for r in tte:
        assert not any(r["prefix"] in t for t in train_texts), r["id"]


# --------------------------------------------------------------------------- math

def test_math_answers_and_arithmetic(math):
    mtr, mte = math
    rng = random.Random(0)
    for r in mte + rng.sample(mtr, 2000):
        boxes = BOXED.findall(r["solution"])
        assert boxes and boxes[-1] == r["answer"], r["id"]
        assert r["solution"].endswith("The final answer is \\boxed{%s}" % r["answer"])
        lines = r["solution"].split("\n")
        assert 2 <= len(lines) - 1 <= 4
        for line in lines[:-1]:
            a, op, b, res = STEP.match(line).groups()
            a, b, res = int(a), int(b), int(res)
            if op == "+":
                assert a + b == res
            elif op == "-":
                assert a - b == res
            elif op == "*":
                assert a * b == res and 2 <= min(a, b) <= 9
            else:
                assert 2 <= b <= 9 and a == b * res
            assert 0 <= res <= 999
        assert int(r["answer"]) == int(STEP.match(lines[-2]).group(4))


# --------------------------------------------------------------------------- code

def test_code_canonical_solutions_pass(code):
    ctr, cte = code
    rng = random.Random(0)
    for r in rng.sample(cte, 50) + rng.sample(ctr, 20):
        ns = {}
        exec(r["prompt"] + r["canonical_solution"] + "\n" + r["test"] + f"\ncheck({r['entry_point']})", ns)
        assert r["canonical_solution"].startswith("    ")
        assert r["test"].startswith("def check(candidate):")


def test_code_completion_is_fenced_full_function(code):
    ctr, _ = code
    for r in ctr[:500]:
        c = r["completion"]
        assert c.startswith("```python\n") and c.endswith("\n```")
        body = c[len("```python\n"):-len("```")]
        sig = [l for l in r["prompt"].splitlines() if l.startswith("def ")][0]
        assert body == sig + "\n" + r["canonical_solution"]
        ns = {}
        exec(r["prompt"] + body + "\n" + r["test"] + f"\ncheck({r['entry_point']})", ns)


# --------------------------------------------------------------------------- text

def test_text_records(text, tok):
    ttr, tte = text
    for r in tte:
        n_pre = len(tok(r["prefix"], add_special_tokens=False)["input_ids"])
        n_ref = len(tok(r["reference"], add_special_tokens=False)["input_ids"])
        assert 12 <= n_pre <= 16 and 40 <= n_ref <= 48, (r["id"], n_pre, n_ref)
    # cuts are moved to word starts where one is near (a few long words leave no choice)
    assert sum(r["reference"][:1].isspace() for r in tte) >= 0.95 * len(tte)
    assert all(r["text"].strip() for r in ttr)


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_special_ids(tok, special_ids):
    assert len(tok) == special_ids["vocab_size"]
    assert tok.bos_token == "<|startoftext|>" and tok.bos_token_id == special_ids["bos_token_id"]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == special_ids["eos_token_id"]
    assert tok.pad_token_id == special_ids["pad_token_id"] == special_ids["eos_token_id"]
    assert tok.mask_token == "<|mdm_mask|>" and tok.mask_token_id == special_ids["mask_token_id"]
    assert tok.convert_tokens_to_ids("<|eot_id|>") == special_ids["eot_token_id"]
    assert tok.convert_tokens_to_ids("<|start_header_id|>") == special_ids["start_header_id"]
    assert tok.convert_tokens_to_ids("<|end_header_id|>") == special_ids["end_header_id"]
    assert special_ids["mask_token_id"] != special_ids["pad_token_id"]
    assert len(set(v for k, v in special_ids.items() if k != "vocab_size" and k != "pad_token_id")) == 6
    # special tokens are single ids inside text, and no BOS is added automatically
    ids = tok("a<|mdm_mask|>b<|eot_id|>")["input_ids"]
    assert special_ids["mask_token_id"] in ids and special_ids["eot_token_id"] in ids
    assert ids[0] != special_ids["bos_token_id"]


def test_chat_template_llada_structure(tok, special_ids):
    msgs = [{"role": "system", "content": MATH_SYSTEM}, {"role": "user", "content": "  What is 2 + 3?\n"}]
    s = tok.apply_chat_template(msgs, tokenize=False)
    expected = ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + MATH_SYSTEM
                + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
                + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert s == expected
    # the assistant header is appended with or without add_generation_prompt
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert ids[0] == special_ids["bos_token_id"] and ids.count(special_ids["bos_token_id"]) == 1
    assert ids.count(special_ids["eot_token_id"]) == 2


def test_chat_template_matches_real_llada_rendering(tok):
    import jinja2

    with open(LLADA_CONFIG) as f:
        real = json.load(f)["chat_template"]
    env = jinja2.Environment()
    for msgs in ([{"role": "user", "content": "hi "}],
                 [{"role": "system", "content": "You complete only Python code."},
                  {"role": "user", "content": "def f(x):\n    \"\"\"doc\"\"\"\n"}],
                 [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b"},
                  {"role": "user", "content": "c"}]):
        want = env.from_string(real).render(messages=msgs, bos_token="<|startoftext|>")
        assert tok.apply_chat_template(msgs, tokenize=False) == want


def test_code_round_trip(tok, code):
    ctr, cte = code
    texts = [r["completion"] for r in ctr] + [r["prompt"] + r["canonical_solution"] for r in cte]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t
    odd = "def f(x):\n\tif x:\n        return  '  a\\n'\n\n\n    # done  \n"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd


def test_digits_are_single_tokens(tok, math):
    for d in "0123456789":
        assert len(tok(d, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("x = 1234567890 and 472.", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert digits == list("1234567890") + list("472")
    _, mte = math
    for r in mte[:100]:
        for i in tok(r["solution"], add_special_tokens=False)["input_ids"]:
            p = tok.decode([i])
            assert not any(ch.isdigit() for ch in p) or len(p) == 1
