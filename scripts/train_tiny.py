"""Train the bundled tiny LLaDA (models/tiny-llada) with the masked-diffusion SFT objective.

    python scripts/train_tiny.py --device cuda --minutes 6        # what produced the shipped weights
    python scripts/train_tiny.py --device cpu --steps 200         # a smoke run

Data: data/tiny_{math,code,text}_train.jsonl (scripts/make_tiny_data.py); tokenizer:
models/tiny-llada. Objective (LLaDA SFT): the answer region (response, <|eot_id|>, then
<|endoftext|> padding up to the task's generation length) is masked with probability
t ~ U(eps, 1] per example; cross-entropy on the masked positions, weighted by 1/t and
normalised by the answer length. Prompts are left-padded and key-masked exactly as at
evaluation time.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import custom_demask_eval as cde  # noqa: E402

ROOT = cde.REPO
OUT = os.path.join(ROOT, "models", "tiny-llada")
GEN_LENGTH = {"math": 64, "code": 64, "text": 48}
TEXT_PREFIX = (8, 24)


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


def answer_ids(tokenizer, text, length, eot, eos):
    ids = tokenizer(text, add_special_tokens=False).input_ids + [eot]
    return ids + [eos] * (length - len(ids)) if len(ids) <= length else None


def build_examples(tokenizer, special):
    """(prompt ids, answer ids) pairs of all three tasks."""
    eot, eos, bos = special["eot_token_id"], special["eos_token_id"], special["bos_token_id"]
    examples = []
    for r in cde.read_jsonl(os.path.join(ROOT, "data", "tiny_math_train.jsonl")):
        prompt = cde.encode_chat(tokenizer, [{"role": "system", "content": cde.MATH_SYSTEM},
                                             {"role": "user", "content": r["problem"]}])
        examples.append((prompt, answer_ids(tokenizer, r["solution"], GEN_LENGTH["math"], eot, eos)))
    for r in cde.read_jsonl(os.path.join(ROOT, "data", "tiny_code_train.jsonl")):
        prompt = cde.encode_chat(tokenizer, [{"role": "system", "content": cde.CODE_SYSTEM},
                                             {"role": "user", "content": r["prompt"]}])
        examples.append((prompt, answer_ids(tokenizer, r["completion"], GEN_LENGTH["code"], eot, eos)))
    rng = random.Random(0)
    for r in cde.read_jsonl(os.path.join(ROOT, "data", "tiny_text_train.jsonl")):
        ids = tokenizer(r["text"], add_special_tokens=False).input_ids
        for _ in range(8):  # several prefix cuts per document
            cut = rng.randint(*TEXT_PREFIX)
            rest = ids[cut:cut + GEN_LENGTH["text"]]
            if len(rest) >= 8:
                examples.append(([bos] + ids[:cut], rest + [eos] * (GEN_LENGTH["text"] - len(rest))))
    dropped = sum(a is None for _, a in examples)
    print(f"{len(examples)} examples, {dropped} dropped (answer longer than the generation length)")
    return [e for e in examples if e[1] is not None]


def make_batch(examples, pad_id, device):
    width = max(len(p) + len(a) for p, a in examples)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    key_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    answer = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, (p, a) in enumerate(examples):
        start = width - len(p) - len(a)
        x[row, start:] = torch.tensor(p + a)
        key_mask[row, start:] = True
        answer[row, width - len(a):] = True
    return x.to(device), key_mask.to(device), answer.to(device)


def diffusion_loss(net, x, key_mask, answer, mask_id, eps=1e-3):
    t = (1 - eps) * torch.rand(x.shape[0], 1, device=x.device) + eps
    masked = answer & (torch.rand(x.shape, device=x.device) < t)
    noisy = torch.where(masked, mask_id, x)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    query = torch.arange(x.shape[1], device=x.device).expand_as(x)
    logits = cde.forward_logits(net, noisy, positions, key_mask[:, None, None, :], query)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
    per_example = (ce * masked / t).sum(1) / answer.sum(1)
    return per_example.mean()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--minutes", type=float, default=6.0, help="stop after this much training time")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=OUT)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    tokenizer = cde.load_tokenizer(OUT, "llada")
    special = json.load(open(os.path.join(OUT, "special_ids.json")))
    config = model_config(special, args)
    examples = build_examples(tokenizer, special)
    net = cde.LLaDA(config).to(args.device)
    for name, w in net.named_parameters():
        torch.nn.init.normal_(w, std=0.02) if w.dim() > 1 else torch.nn.init.ones_(w)
    print(f"{sum(w.numel() for w in net.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    budget, start, step, log = args.minutes * 60, time.time(), 0, []
    while step < args.steps and time.time() - start < budget:
        progress = min(1.0, max(step / args.steps, (time.time() - start) / budget))
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = make_batch(random.sample(examples, args.batch_size), special["eos_token_id"], args.device)
        with autocast:
            loss = diffusion_loss(net, *batch, config["mask_token_id"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            log.append(dict(step=step, loss=round(loss.item(), 4), lr=lr, seconds=round(time.time() - start, 1)))
            print(log[-1], flush=True)

    os.makedirs(args.out, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()},
              os.path.join(args.out, "model.safetensors"))
    json.dump(config, open(os.path.join(args.out, "config.json"), "w"), indent=2)
    json.dump(dict(args=vars(args), steps=step, seconds=round(time.time() - start, 1), device=args.device,
                   gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None, log=log),
              open(os.path.join(args.out, "training_log.json"), "w"), indent=2)
    print(f"trained {step} steps in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
