"""Train the bundled tiny LLaDA (models/tiny-llada) with the masked-diffusion SFT objective.

    python scripts/train_tiny.py --device cuda                    # the shipped weights' recipe
    python scripts/train_tiny.py --device cpu --steps 50 --math_problems 0 --out /tmp/tiny   # smoke run

The shipped weights came from a time-budgeted run (--steps 1000000 --minutes 4.2 on an H200
shared with one other training run) that stopped after 8444 steps; the defaults replay that step
count, with the cosine schedule over steps instead of time.

Data: data/tiny_{math,code,text}_train.jsonl (scripts/make_tiny_data.py) and the SmolLM2
corpus data/tiny_text_corpus.jsonl.gz (scripts/make_text_corpus.py), plus fresh math problems
from the same generator (seed MATH_EXTRA_SEED, test problems and stored ones excluded) up to
--math_problems in total; tokenizer: models/tiny-llada. Each batch mixes four kinds of examples
by --task_share: math and code (chat SFT), text (a document prefix of TEXT_PREFIX tokens as the
prompt, its next 48 tokens as the answer: the tiny-text task) and raw (a 64-token window of a
document behind <|startoftext|> alone, every token maskable: LLaDA's pre-training objective).
Objective (LLaDA SFT): the answer region (response, <|eot_id|>, then <|endoftext|> padding up
to the task's generation length) is masked with probability t ~ U(eps, 1] per example;
cross-entropy on the masked positions, weighted by 1/t and normalised by the answer length. Prompts are left-padded and key-masked exactly as at
evaluation time. All examples live on the device as one left-padded tensor, so a step
launches no host work; on CUDA the step is compiled with torch.compile.
"""
import argparse
import gzip
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demask import REPO, networks, tasks  # noqa: E402
import make_tiny_data  # noqa: E402

ROOT = REPO
OUT = os.path.join(ROOT, "models", "tiny-llada")
GEN_LENGTH = {"math": 64, "code": 64, "text": 48, "raw": 64}
TASK_SHARE = "math:0.6,code:0.18,text:0.13,raw:0.09"
TEXT_FILES = ("tiny_text_train.jsonl", "tiny_text_corpus.jsonl.gz")
TEXT_PREFIX = (8, 24)
TEXT_CUTS = 4
RAW_WINDOWS = 2
MATH_EXTRA_SEED = 7707
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "special_ids.json")


def model_config(special, args):
    """A config.json in LLaDA-8B's format (same key names), at small size."""
    vocab = special["vocab_size"]
    return dict(architectures=["LLaDAModelLM"], model_type="llada", block_type="llama", activation_type="silu",
                layer_norm_type="rms", rms_norm_eps=1e-5, rope=True, rope_theta=500000.0, rope_full_precision=True,
                d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_heads,
                mlp_hidden_size=args.mlp, vocab_size=vocab, embedding_size=vocab, max_sequence_length=512,
                include_bias=False, include_qkv_bias=False, weight_tying=False, scale_logits=False,
                mask_token_id=special["mask_token_id"], eos_token_id=special["eos_token_id"], pad_token_id=special["eos_token_id"],
                use_cache=False)


def math_problems(n):
    """The stored training problems, topped up with fresh ones (never a test or stored problem)."""
    stored = tasks.read_jsonl(os.path.join(ROOT, "data", "tiny_math_train.jsonl"))
    test = tasks.read_jsonl(os.path.join(ROOT, "data", "tiny_math_test.jsonl"))
    if n <= len(stored):
        return stored[:n]
    exclude = {r["problem"] for r in stored + test}
    return stored + make_tiny_data.make_math_split(n - len(stored), MATH_EXTRA_SEED, exclude=exclude)


def chat_prompts(tokenizer, system, users):
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": u}],
                                           tokenize=False, add_generation_prompt=True) for u in users]
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def pad_answer(ids, length, special):
    """ids padded with <|endoftext|> to the generation length (None if too long)."""
    return ids + [special["eos_token_id"]] * (length - len(ids)) if len(ids) <= length else None


def answers(tokenizer, texts, length, special):
    """Response ids + <|eot_id|>, padded to the generation length."""
    return [pad_answer(e.ids + [special["eot_token_id"]], length, special)
            for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def text_documents(tokenizer):
    """Token ids of every training document (stored train split, then the SmolLM2 corpus)."""
    texts = []
    for name in TEXT_FILES:
        path = os.path.join(ROOT, "data", name)
        with (gzip.open(path, "rt", encoding="utf-8") if name.endswith(".gz") else open(path, encoding="utf-8")) as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def text_examples(documents, special, rng):
    """Continuations (prefix -> next 48 tokens) and raw windows (every token maskable)."""
    text, raw = [], []
    bos, n = [special["bos_token_id"]], GEN_LENGTH["raw"]
    for ids in documents:
        for _ in range(TEXT_CUTS):
            cut = rng.randint(*TEXT_PREFIX)
            rest = ids[cut:cut + GEN_LENGTH["text"]]
            if len(rest) >= 8:
                text.append((bos + ids[:cut], pad_answer(rest, GEN_LENGTH["text"], special)))
        for _ in range(RAW_WINDOWS):
            start = rng.randint(0, max(0, len(ids) - n))
            raw.append((bos, pad_answer(ids[start:start + n], n, special)))
    return text, raw


def build_examples(tokenizer, special, n_math):
    """{kind: [(prompt ids, answer ids)]} for the four kinds of examples."""
    maths = math_problems(n_math)
    codes = tasks.read_jsonl(os.path.join(ROOT, "data", "tiny_code_train.jsonl"))
    examples = {
        "math": list(zip(chat_prompts(tokenizer, tasks.MATH_SYSTEM, [r["problem"] for r in maths]),
                         answers(tokenizer, [r["solution"] for r in maths], GEN_LENGTH["math"], special))),
        "code": list(zip(chat_prompts(tokenizer, tasks.CODE_SYSTEM, [r["prompt"] for r in codes]),
                         answers(tokenizer, [r["completion"] for r in codes], GEN_LENGTH["code"], special)))}
    examples["text"], examples["raw"] = text_examples(text_documents(tokenizer), special, random.Random(0))
    for task, pairs in examples.items():
        kept = [(p, a) for p, a in pairs if a is not None]
        print(f"{task}: {len(kept)} examples, {len(pairs) - len(kept)} dropped (answer longer than the generation length)")
        examples[task] = kept
    return examples


def parse_share(text):
    """'math:0.45,code:0.15,...' -> {kind: share}, every kind of GEN_LENGTH named once."""
    share = {k: float(v) for k, v in (item.split(":") for item in text.split(","))}
    if set(share) != set(GEN_LENGTH) or min(share.values()) < 0:
        raise SystemExit(f"--task_share needs a non-negative share for each of {sorted(GEN_LENGTH)}")
    return share


def pack(examples, share, pad_id, device):
    """All examples left-padded into one tensor; per row the prompt and answer lengths and a sampling weight."""
    rows = [(task, p, a) for task, pairs in examples.items() for p, a in pairs]
    width = max(len(p) + len(a) for _, p, a in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, (_, p, a) in enumerate(rows):
        x[i, width - len(p) - len(a):] = torch.tensor(p + a)
    prompt_len = torch.tensor([len(p) for _, p, _ in rows])
    answer_len = torch.tensor([len(a) for _, _, a in rows])
    weight = torch.tensor([share[task] / len(examples[task]) for task, _, _ in rows])
    return x.to(device), prompt_len.to(device), answer_len.to(device), weight.to(device)


def diffusion_loss(net, x, prompt_len, answer_len, mask_id, tail=max(GEN_LENGTH.values()), eps=1e-3):
    """LLaDA's SFT loss on a left-padded batch; logits only for the last `tail` columns (the longest answer)."""
    B, W = x.shape
    col = torch.arange(W, device=x.device)
    key_mask = col >= (W - prompt_len - answer_len)[:, None]
    answer = col >= (W - answer_len)[:, None]
    t = (1 - eps) * torch.rand(B, 1, device=x.device) + eps
    masked = answer & (torch.rand(x.shape, device=x.device) < t)
    noisy = torch.where(masked, mask_id, x)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    query = col[W - tail:].expand(B, -1)
    logits = networks.forward_logits(net, noisy, positions, key_mask[:, None, None, :], query)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x[:, -tail:], reduction="none")
    per_example = (ce * masked[:, -tail:] / t).sum(1) / answer_len
    return per_example.mean()


def arguments(defaults=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=8444)
    p.add_argument("--minutes", type=float, default=30.0, help="stop after this much training time")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=6)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument("--math_problems", type=int, default=300_000, help="stored ones first, then fresh ones")
    p.add_argument("--task_share", default=TASK_SHARE, help="sampling share of each kind of example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=OUT)
    p.set_defaults(**(defaults or {}))
    return p


def train(args, config, packed, tail, init=None):
    """AdamW with warm-up and a cosine schedule over --steps (or --minutes, whichever ends first)
    on the packed examples, from random weights or the state dict `init`; returns the network, the
    steps taken, the loss log and the seconds."""
    x_all, prompt_all, answer_all, weight = packed
    net = networks.LLaDA(config).to(args.device)
    for name, w in net.named_parameters():
        torch.nn.init.normal_(w, std=0.02) if w.dim() > 1 else torch.nn.init.ones_(w)
    if init is not None:
        net.load_state_dict(init)
    print(f"{sum(w.numel() for w in net.parameters()) / 1e6:.2f}M parameters")
    cuda = args.device.startswith("cuda")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98), fused=cuda)
    loss_fn = torch.compile(diffusion_loss) if cuda else diffusion_loss
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    budget, start, step, log = args.minutes * 60, time.time(), 0, []
    while step < args.steps and time.time() - start < budget:
        # learning rate: warm-up, then cosine over steps or time
        progress = min(1.0, max(step / args.steps, (time.time() - start) / budget))
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr

        # one batch drawn by the kinds' shares, one optimiser step
        rows = torch.multinomial(weight, args.batch_size, replacement=True)
        with autocast:
            loss = loss_fn(net, x_all[rows], prompt_all[rows], answer_all[rows], config["mask_token_id"], tail)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 500 == 0:
            log.append(dict(step=step, loss=round(loss.item(), 4), lr=lr, seconds=round(time.time() - start, 1)))
            print(log[-1], flush=True)
    return net, step, log, round(time.time() - start, 1)


def save(args, config, net, step, log, seconds, extra=None, copy_tokenizer=True):
    """model.safetensors, config.json and training_log.json in --out (plus the bundled model's
    tokenizer files when --out is another folder and `copy_tokenizer`)."""
    os.makedirs(args.out, exist_ok=True)
    if copy_tokenizer and os.path.abspath(args.out) != os.path.abspath(OUT):  # a self-contained model folder
        for name in TOKENIZER_FILES:
            shutil.copy(os.path.join(OUT, name), args.out)
    from safetensors.torch import save_file
    save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()},
              os.path.join(args.out, "model.safetensors"))
    json.dump(config, open(os.path.join(args.out, "config.json"), "w"), indent=2)
    cuda = args.device.startswith("cuda")
    json.dump(dict(args=vars(args), steps=step, seconds=seconds, device=args.device,
                   gpu=torch.cuda.get_device_name() if cuda else None, log=log, **(extra or {})),
              open(os.path.join(args.out, "training_log.json"), "w"), indent=2)
    print(f"trained {step} steps in {seconds:.0f} s")


def main():
    args = arguments().parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = networks.load_tokenizer(OUT, "llada")
    special = json.load(open(os.path.join(OUT, "special_ids.json")))
    config = model_config(special, args)
    data_start = time.time()
    share = parse_share(args.task_share)
    packed = pack(build_examples(tokenizer, special, args.math_problems), share, special["eos_token_id"], args.device)
    print(f"{len(packed[0])} examples of width {packed[0].shape[1]} ready in {time.time() - data_start:.0f} s")
    net, step, log, seconds = train(args, config, packed, max(GEN_LENGTH.values()))
    save(args, config, net, step, log, seconds)


if __name__ == "__main__":
    main()
