"""Generate the English training corpus of the bundled tiny model: short documents written by
SmolLM2-135M-Instruct (the GGUF of the offline scorer, Apache-2.0), sampled in batches with
transformers on CPU.

    python scripts/make_text_corpus.py                 # data/tiny_text_corpus.jsonl.gz
    python scripts/make_text_corpus.py --docs 512      # a smaller corpus (resumes a partial one)

Prompts: PROMPT_TEMPLATES filled from small word lists (stories, diaries, letters, news, recipes,
explanations, descriptions, reviews, instructions), drawn with seed CORPUS_SEED, which no test
document used (the tiny-text test documents come from make_tiny_data.py's seed 5505). Sampling:
llama.cpp's chain with the settings that made data/tiny_text_raw.jsonl (top-k 40, then top-p 0.95,
then min-p 0.05, then temperature 0.8), up to MAX_NEW_TOKENS tokens or <|im_end|>. Batch b draws
with torch.Generator seeded CORPUS_SEED * 1000 + b; bf16 matmuls make the exact tokens depend on
the CPU, not the distribution. Rows are appended to a .partial file as batches finish, so a killed
run resumes; the finished file holds the documents after clean-up (whitespace, trailing unfinished
sentence), exact-duplicate removal, and removal of every document that contains a tiny-text test
prefix or reference or shares a 12-word span with one (zero overlap with the test split).
"""
import argparse
import gzip
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demask import textmetrics  # noqa: E402
import make_tiny_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "data", "tiny_text_corpus.jsonl.gz")
CORPUS_SEED = 9909
N_DOCS = 6656
BATCH = 256
MAX_NEW_TOKENS = 100
TOP_K, TOP_P, MIN_P, TEMPERATURE = 40, 0.95, 0.05, 0.8
OVERLAP_WORDS = 12

WORDS = dict(
    animal=make_tiny_data.TEXT_ANIMALS, activity=make_tiny_data.TEXT_ACTIVITIES, place=make_tiny_data.TEXT_PLACES,
    topic=make_tiny_data.TEXT_TOPICS, person=make_tiny_data.TEXT_PEOPLE, event=make_tiny_data.TEXT_EVENTS,
    food=["apple pie", "tomato soup", "pancakes", "fried rice", "banana bread", "a vegetable salad", "pizza",
          "lemonade", "chicken curry", "oatmeal cookies", "pasta with garlic", "a fruit smoothie"],
    news=["a new bridge opening in town", "a storm hitting the coast", "a local team winning the cup",
          "a school starting a garden", "a library reopening", "a festival in the city square",
          "a lost dog found after a week", "a new bus line", "a bake sale raising money", "a river flooding a farm",
          "a museum showing old maps", "a town planting a thousand trees"],
    thing=["a pair of running shoes", "a small tent", "a kitchen knife", "a children's book", "a bicycle helmet",
           "a coffee shop", "a board game", "a rain jacket", "a new phone", "a family restaurant"],
    task=["plant tomatoes", "clean a bicycle", "pack for a trip", "make a paper boat", "wash a dog",
          "study for a test", "start running", "save money", "write a good letter", "care for a houseplant"],
    science=["volcanoes", "the water cycle", "magnets", "the solar system", "earthquakes", "electricity",
             "the human heart", "clouds", "photosynthesis", "the seasons", "sound", "gravity"],
)
PROMPT_TEMPLATES = [
    "Write a short story about a {animal} who {activity}.",
    "Describe {place}.",
    "Explain {topic} in simple words.",
    "Write a short story about {person} and {event}.",
    "Write a letter to a friend about {event}.",
    "Tell a children's story about a {animal} in {place}.",
    "Write a diary entry by {person} after {event}.",
    "Describe a day in the life of {person}.",
    "Write a short news report about {news}.",
    "Write a recipe for {food}, with a short introduction.",
    "Explain how {science} work, for a curious child.",
    "Write a short review of {thing}.",
    "Explain how to {task}, step by step.",
    "Write an email to a neighbour about {event}.",
    "Tell the story of {person} who visits {place}.",
    "Write a short essay about {topic}.",
]


def prompts(n, seed):
    """n user prompts, template i % len(templates) filled at random."""
    rng = random.Random(seed)
    fill = lambda t: re.sub(r"\{(\w+)\}", lambda m: rng.choice(WORDS[m.group(1)]), t)
    return [fill(PROMPT_TEMPLATES[i % len(PROMPT_TEMPLATES)]) for i in range(n)]


def sample_next(logits, gen):
    """llama.cpp's default chain: top-k, top-p, min-p, temperature, then a draw."""
    top, idx = logits.float().topk(TOP_K, dim=-1)
    p = top.softmax(-1)
    keep = (p.cumsum(-1) - p) < TOP_P                 # the smallest prefix with mass >= top_p
    keep &= p >= MIN_P * p[:, :1]
    keep[:, 0] = True
    w = torch.where(keep, top / TEMPERATURE, float("-inf")).softmax(-1)
    return idx.gather(-1, torch.multinomial(w, 1, generator=gen))


@torch.inference_mode()
def generate(model, tok, users, gen):
    """One batch of chat completions (SmolLM2's template with its default system turn)."""
    texts = [tok.apply_chat_template([{"role": "user", "content": u}], tokenize=False, add_generation_prompt=True)
             for u in users]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    attn = enc.attention_mask
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=enc.input_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    done = torch.zeros(len(users), dtype=torch.bool)
    new = []
    for _ in range(MAX_NEW_TOKENS):
        nxt = sample_next(out.logits[:, -1], gen)
        nxt[done] = end
        new.append(nxt)
        done |= nxt[:, 0] == end
        if done.all():
            break
        attn = torch.cat([attn, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=attn, position_ids=pos, past_key_values=out.past_key_values,
                    use_cache=True)
    ids = torch.cat(new, 1).tolist()
    rows = []
    for u, row in zip(users, ids):
        n = row.index(end) if end in row else len(row)
        rows.append(dict(prompt=u, smollm2_tokens=n, text=tok.decode(row[:n], skip_special_tokens=True)))
    return rows


def test_spans():
    """Test prefixes and references, and every 12-word span of them."""
    test = make_tiny_data.read_jsonl(make_tiny_data.DATA / "tiny_text_test.jsonl")
    pieces = [r["prefix"].strip() for r in test] + [r["reference"].strip() for r in test]
    spans = set()
    for r in test:
        words = (r["prefix"] + r["reference"]).split()
        spans |= {" ".join(words[i:i + OVERLAP_WORDS]) for i in range(len(words) - OVERLAP_WORDS + 1)}
    return pieces, spans


def finish(rows):
    """Clean, deduplicate, drop every document overlapping the test split."""
    pieces, spans = test_spans()
    seen, kept, dropped = set(), [], {"empty": 0, "duplicate": 0, "test overlap": 0}
    for r in rows:
        text = make_tiny_data.clean_generation(r["text"])
        words = text.split()
        if len(words) < 20:
            dropped["empty"] += 1
        elif text in seen:
            dropped["duplicate"] += 1
        elif any(p in text for p in pieces) or any(" ".join(words[i:i + OVERLAP_WORDS]) in spans
                                                   for i in range(len(words) - OVERLAP_WORDS + 1)):
            dropped["test overlap"] += 1
        else:
            seen.add(text)
            kept.append(dict(r, id=f"TinyTextCorpus/{len(kept)}", text=text))
    return kept, dropped


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=N_DOCS)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scorer = textmetrics.load_scorer(textmetrics.SMOLLM2_NAME, "cpu")
    model, tok = scorer.model.to(torch.bfloat16).eval(), scorer.tokenizer
    tok.padding_side = "left"
    users = prompts(args.docs, CORPUS_SEED)
    partial = OUT + ".partial"
    rows = make_tiny_data.read_jsonl(Path(partial)) if os.path.exists(partial) else []
    start, n_tok = time.time(), 0
    with open(partial, "a", encoding="utf-8") as f:
        for b in range(len(rows) // BATCH, (args.docs + BATCH - 1) // BATCH):
            gen = torch.Generator().manual_seed(CORPUS_SEED * 1000 + b)
            batch = generate(model, tok, users[b * BATCH:(b + 1) * BATCH], gen)
            for r in batch:
                f.write(json.dumps(dict(r, batch_seed=CORPUS_SEED * 1000 + b), ensure_ascii=False) + "\n")
            f.flush()
            rows += batch
            n_tok += sum(r["smollm2_tokens"] for r in batch)
            print(f"{len(rows)}/{args.docs} documents, {n_tok / (time.time() - start):.0f} tokens/s", flush=True)
    kept, dropped = finish(rows)
    with gzip.open(OUT, "wt", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.remove(partial)
    print(f"{len(kept)} documents written to {os.path.relpath(OUT, ROOT)}; dropped {dropped}")


if __name__ == "__main__":
    main()
