"""Throughput of the llada-math decode loop: batch 1 (as the original harness) versus batched.

    python scripts/bench_throughput.py --shapes llada,dream --batch_sizes 1,16      # GPU, random weights
    python scripts/bench_throughput.py --model_path models/tiny-llada --device cpu  # CPU, bundled model

Random-weight models of the real LLaDA-8B / Dream-7B shapes are built on the device (no
download). Prompts have the token lengths of the real MATH-500 prompts
(data/math500_prompt_lengths.json) and random ids. The decoder is confidence_greedy with
gen 256, steps 256, block 64, so every sample costs exactly 256 forwards. Reported per batch
size: ms per forward call, sample-forwards per second, achieved TFLOP/s and its fraction of
the bf16 planning bound (790 TFLOP/s, ../shared/docs/models.md section 7), and the projected
minutes for the 500-sample label.
"""
import argparse
import json
import os
import random
import sys
import time

from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import custom_demask_eval as cde  # noqa: E402

PEAK = 790e12
CONFIGS = {  # the real checkpoints' config.json values that matter for the forward
    "llada": dict(model_type="llada", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                  rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=126464, embedding_size=126464,
                  mask_token_id=126336, eos_token_id=126081, pad_token_id=126081),
    "dream": dict(model_type="Dream", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, intermediate_size=18944, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  vocab_size=152064, mask_token_id=151666, eos_token_id=151643, pad_token_id=151643),
}


class CountingLM(cde.DiffusionLM):
    """DiffusionLM that also counts forward calls and their FLOPs (2 per multiply-add)."""

    def __call__(self, x, attention_mask=None, query_idx=None, positions=None):
        live = int((x == self.mask_id).any(1).sum())
        T, Q = x.shape[1], x.shape[1] if query_idx is None else query_idx.shape[1]
        self.calls += 1
        self.flops += live * (2 * self.linear_params * T + 4 * T * T * self.width * self.layers
                              + 2 * self.width * self.vocab_size * Q)
        return super().__call__(x, attention_mask, query_idx, positions)


def build(shape, model_path, device):
    if model_path:
        m = cde.load_model(model_path, device=device)
        net, family, config = m.net, m.family, json.load(open(os.path.join(model_path, "config.json")))
    else:
        config, family = CONFIGS[shape], shape
        with torch.device(device):
            net = cde.MODEL_CLASSES[family](config).to(torch.bfloat16)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.02)
    dtype = next(net.parameters()).dtype
    model = CountingLM(net.eval(), family, None, config, torch.device(device), dtype)
    embed, blocks, _, head = net.parts()
    model.linear_params = sum(p.numel() for p in blocks.parameters() if p.dim() == 2)
    model.width, model.layers = embed.weight.shape[1], len(blocks)
    model.calls, model.flops = 0, 0
    return model


def prompts(model, family, n, seed):
    lengths = json.load(open(os.path.join(cde.REPO, "data", "math500_prompt_lengths.json")))[family]
    rng = random.Random(seed)
    picked = rng.sample(lengths, n)
    return [[rng.randrange(min(model.mask_id, model.pad_id)) for _ in range(length)] for length in picked]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(model, batch, args, decoder=None):
    ids, mask = cde.left_pad(batch, model.pad_id)
    model.start_batch(mask)
    decoder = decoder or cde.TopKDecoder(model.mask_id, score="confidence")
    x, _ = decoder.decode(model, ids, args.gen_length, args.steps, args.block_length)
    return int(model.nfe.sum())


def invariance(model, family, n, batch_size, args):
    """Greedy KLASS (llada-math thresholds) on n prompts alone and in left-padded batches:
    the fraction of identical generations and the per-row forward counts."""
    decoder = cde.DemaskDecoder(model.mask_id, conf_threshold=0.6, kl_threshold=0.01)
    samples = sorted(prompts(model, family, n, 1), key=len)

    def decode(batch):
        ids, mask = cde.left_pad(batch, model.pad_id)
        model.start_batch(mask)
        x, _ = decoder.decode(model, ids, args.gen_length, args.steps, args.block_length)
        return x[:, -args.gen_length:].tolist(), model.nfe.tolist()
    alone = [decode([p]) for p in samples]
    together = [decode(samples[i:i + batch_size]) for i in range(0, n, batch_size)]
    gens = [g for out in together for g in out[0]]
    steps = [s for out in together for s in out[1]]
    same = sum(g == a[0][0] for g, a in zip(gens, alone)) / n
    print(f"{family} bf16 batch invariance: {100 * same:.0f}% of {n} generations identical at B=1 vs B={batch_size}; "
          f"avg_steps {sum(a[1][0] for a in alone) / n:.2f} vs {sum(steps) / n:.2f}", flush=True)
    return dict(model=family, identical_fraction=same, n=n, batch=batch_size)


def graph_error(model, family):
    """Max |logit| difference between CUDA-graph replay and the eager forward."""
    x = torch.tensor(prompts(model, family, 2, 2)[0][:100], device=model.device)[None]
    captured, replayed = model(x).logits, model(x).logits
    graphed, model.forward = model.forward, partial(cde.forward_logits, model.net)
    eager = model(x).logits
    model.forward = graphed
    return max((captured - eager).abs().max().item(), (replayed - eager).abs().max().item())


def bench(model, family, batch_size, args):
    samples = sorted(prompts(model, family, args.samples * batch_size if batch_size > 1 else args.samples, 0), key=len)
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    run(model, batches[0][:batch_size], argparse.Namespace(**{**vars(args), "steps": 4, "gen_length": 16,
                                                              "block_length": 16}))  # warm-up
    model.calls, model.flops, sample_forwards = 0, 0, 0
    sync(args.device)
    start = time.perf_counter()
    for batch in batches:
        sample_forwards += run(model, batch, args)
    sync(args.device)
    seconds = time.perf_counter() - start
    rate = sample_forwards / seconds
    return dict(model=family, batch=batch_size, samples=len(samples), ms_per_forward=1000 * seconds / model.calls,
                sample_forwards_per_s=rate, tflops=model.flops / seconds / 1e12,
                bound_fraction=model.flops / seconds / PEAK,
                projected_minutes=500 * args.steps / rate / 60)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llada,dream")
    p.add_argument("--model_path", help="benchmark this real model instead of random-weight shapes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_sizes", default="1,16")
    p.add_argument("--samples", type=int, default=4, help="batches per batch size (samples at batch 1)")
    p.add_argument("--gen_length", type=int, default=256)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--block_length", type=int, default=64)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--invariance", type=int, default=0, help="also measure batch invariance on this many prompts")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for shape in ([None] if args.model_path else args.shapes.split(",")):
        model = build(shape, args.model_path, args.device)
        if args.device.startswith("cuda"):
            print(f"{model.family}: CUDA graph vs eager max |diff| of logits: {graph_error(model, model.family)}")
        if args.eager or not args.device.startswith("cuda"):
            model.forward = partial(cde.forward_logits, model.net)
        if args.invariance:
            rows.append(invariance(model, model.family, args.invariance, 8, args))
        for b in map(int, args.batch_sizes.split(",")):
            rows.append(bench(model, model.family, b, args))
            r = rows[-1]
            print(f"{r['model']:6s} B={r['batch']:3d} n={r['samples']:4d}  {r['ms_per_forward']:8.2f} ms/forward  "
                  f"{r['sample_forwards_per_s']:8.1f} sample-forwards/s  {r['tflops']:6.1f} TFLOP/s "
                  f"({100 * r['bound_fraction']:.0f}% of bound)  projected {r['projected_minutes']:.1f} min / 500 samples",
                  flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    rows = [r for r in rows if "ms_per_forward" in r] + [r for r in rows if "ms_per_forward" not in r]
    env = dict(eager=args.eager, device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", torch=torch.__version__)
    print(json.dumps(env))
    if args.json:
        json.dump(dict(env=env, rows=rows), open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
