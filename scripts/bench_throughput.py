"""Throughput of the llada-math decode loop: batch 1 (as the original harness) versus batched.

    python scripts/bench_throughput.py --shapes llada,dream --batch_sizes 1,16      # GPU, random weights
    python scripts/bench_throughput.py --shapes llada,llada_moe --batch_sizes 1,8 --samples 2  # LLaDA-MoE vs LLaDA-8B
    python scripts/bench_throughput.py --model_path models/tiny-llada --device cpu  # CPU, bundled model
    python scripts/bench_throughput.py --shapes llada --batch_sizes 1,8 --cache none,prefix,dual  # --cache modes
    python scripts/bench_throughput.py --shapes llada --batch_sizes 8 --decoders confidence_greedy,wino,saber  # cost per forward
    python scripts/bench_throughput.py --shapes llada,sdar,fast_dllm_qwen --batch_sizes 1,8,32  # block diffusion, exact cache

Random-weight models of the real LLaDA-8B / Dream-7B / LLaDA-MoE-7B-A1B shapes are built on the
device (no download; LLaDA-MoE's from its config.json in tests/fixtures/model_files, its prompts
with LLaDA's MATH-500 lengths). Prompts have the token lengths of the real MATH-500 prompts
(data/math500_prompt_lengths.json) and random ids, batched as a full run batches them (sorted
by length); --samples batches per batch size are taken at spread length quantiles. The decoder
is confidence_greedy with gen 256, steps 256, block 64, so every sample costs exactly 256
forwards. Reported per batch size: ms per forward call, sample-forwards per second, achieved
useful TFLOP/s (each row at its own length: left padding is not counted; for LLaDA-MoE only the
experts a token is routed to, num_experts_per_tok of num_experts, plus its router) and its fraction of
the bf16 planning bound (790 TFLOP/s: the dense bf16 matmul rate measured on an H200), and the projected
minutes for the 500-sample label. On CUDA the forward is the harness's (compiled blocks, CUDA
graphs) unless --eager; --cache times the CLI's KV-cache modes (one row per batch size and mode;
their forwards are compiled and graphed as well, the FLOPs count only the positions they compute).
--profile adds a kernel-time breakdown; --invariance N the B=1 vs B=8 agreement of greedy KLASS
generations; --widths the first-forward (capture) time and GPU memory over every batch shape of a
full run.
"""
import argparse
import itertools
import json
import os
import random
import sys
import time

from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demask import REPO, core, decoders, kvcache, networks  # noqa: E402
from demask.settings import RunSettings  # noqa: E402

PEAK = 790e12
CONFIGS = {  # the real checkpoints' config.json values that matter for the forward
    "llada": dict(model_type="llada", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                  rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=126464, embedding_size=126464,
                  mask_token_id=126336, eos_token_id=126081, pad_token_id=126081),
    "dream": dict(model_type="Dream", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, intermediate_size=18944, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  vocab_size=152064, mask_token_id=151666, eos_token_id=151643, pad_token_id=151643),
    # the mask id is the tokenizer's (156895, the model card's), there being no tokenizer here
    "llada_moe": dict(json.load(open(os.path.join(REPO, "tests", "fixtures", "model_files", "llada-moe-7b-a1b-instruct",
                                                  "config.json"))), mask_token_id=156895),
}
# block-diffusion shapes: the config.json in tests/fixtures/model_files (shape -> folder)
BLOCK_SHAPES = {"sdar": "sdar-4b-chat", "fast_dllm_qwen": "fast_dllm_v2_7b", "llada2_moe": "llada2.0-mini"}
LENGTHS = {"llada": "llada", "dream": "dream", "llada_moe": "llada", "sdar": "dream", "fast_dllm_qwen": "dream",
           "llada2_moe": "llada"}  # whose MATH-500 prompt lengths a shape uses


def shape_config(shape):
    if shape in BLOCK_SHAPES:
        return json.load(open(os.path.join(REPO, "tests", "fixtures", "model_files", BLOCK_SHAPES[shape], "config.json")))
    return CONFIGS[shape]


class CountingLM(core.DiffusionLM):
    """DiffusionLM that also counts forward calls and their FLOPs (2 per multiply-add): `flops` is
    the useful work (each live row at its own length, as if alone), `padded_flops` what the kernels
    compute (left padding included), `attention_flops` the padded attention part."""

    def reset_counts(self):
        self.calls, self.flops, self.padded_flops, self.attention_flops = 0, 0, 0, 0

    def flops_at(self, T, C, Q):
        """A forward that computes C of T positions (C = T unless --cache) and the logits of Q."""
        return 2 * self.linear_params * C + 4 * C * T * self.width * self.layers + 2 * self.width * self.vocab_size * Q

    def logits(self, x, key_mask, positions=None, query_idx=None, cache=None, prompt_width=None):
        T, Q = x.shape[1], x.shape[1] if query_idx is None else query_idx.shape[1]
        out = super().logits(x, key_mask, positions, query_idx, cache, prompt_width)
        self.calls += 1
        live = (x == self.mask_id).any(1)
        work = cache.work if cache is not None else [(live.nonzero().squeeze(1), T)]
        for rows, C in work:
            lengths = [T] * len(rows) if key_mask is None else key_mask[rows.to(key_mask.device)].sum(1).tolist()
            self.flops += sum(self.flops_at(n, min(C, n), Q) for n in lengths)
            self.padded_flops += len(lengths) * self.flops_at(T, C, Q)
            self.attention_flops += len(lengths) * 4 * C * T * self.width * self.layers
        return out


def build(shape, model_path, device):
    """A CountingLM of random weights at `shape`'s real shapes, or of the checkpoint at model_path;
    `name` is the architecture (llada, dream, llada_moe)."""
    if model_path:
        loaded = networks.load_checkpoint(model_path, device=device)
        loaded.tokenizer = None
    else:
        config = shape_config(shape)
        with torch.device(device):
            net = networks.network_class(networks.model_architecture(config))(config).to(torch.bfloat16)
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.02)
        loaded = SimpleNamespace(net=net.eval(), family=networks.FAMILIES[shape], architecture=shape, tokenizer=None,
                                 config=config, device=torch.device(device), dtype=torch.bfloat16)
    model = CountingLM(loaded)
    model.name = loaded.architecture
    embed, blocks, _, head = model.net.parts()
    model.linear_params = active_linear_params(blocks)
    model.width, model.layers = embed.weight.shape[1], len(blocks)
    model.reset_counts()
    return model


def active_linear_params(blocks):
    """Weights of the blocks' matmuls that one token runs through: all 2-D weights (attention, dense
    MLPs, routers, shared experts) and, of each layer's stacked routed experts, the top_k of them."""
    total = sum(p.numel() for p in blocks.parameters() if p.dim() == 2)
    for block in blocks:
        experts = getattr(getattr(block, "mlp", None), "experts", None)
        if experts is not None:
            stacked = sum(p.numel() for p in experts.parameters())
            total += stacked * block.mlp.top_k // experts.gate_proj.shape[0]
    return total


def prompt_lengths(name):
    return json.load(open(os.path.join(REPO, "data", "math500_prompt_lengths.json")))[LENGTHS[name]]


def random_prompts(model, lengths, seed):
    rng = random.Random(seed)
    ordinary = [i for i in range(min(model.n_tokens, 50_000)) if i not in (model.mask_id, model.pad_id)]
    return [[rng.choice(ordinary) for _ in range(n)] for n in lengths]


def prompts(model, family, n, seed):
    """n prompts with lengths drawn from the real ones."""
    return random_prompts(model, random.Random(seed).sample(prompt_lengths(family), n), seed)


def length_groups(family, batch_size):
    """The prompt lengths of every batch a full run makes (sorted by length, then cut into batches,
    as run_eval does)."""
    lengths = sorted(prompt_lengths(family))
    return [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]


def label_batches(model, family, batch_size, n_batches):
    """n_batches of the batches a full run makes, taken at evenly spaced quantiles of the prompt length."""
    groups = length_groups(family, batch_size)
    return [random_prompts(model, groups[int((j + 0.5) * len(groups) / n_batches)], j) for j in range(n_batches)]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode(model, batch, args, decoder):
    """A left-padded batch decoded as the CLI decodes it (rule checks and forward counts included);
    returns the generations and the forwards counted per row."""
    ids, mask = core.left_pad(batch, model.pad_id)
    run = RunSettings(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                      cache=getattr(args, "cache", "none"))  # bench() sets args.cache per timed mode
    generations, counted, _ = core.decode_rows(run, model, decoder, ids, mask, list(range(len(batch))))
    return generations, counted


def make_decoder(model, args):
    """The timed decoder: --decoder's registered entry with the run's temperature / top_p and the
    llada-math thresholds (0.9, 0.01), its other parameters at their defaults."""
    run = RunSettings(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                      temperature=args.temperature, top_p=args.top_p)
    return decoders.build_decoder(getattr(args, "decoder", "confidence_greedy"), model.mask_id, run, {})


def run(model, batch, args):
    return sum(decode(model, batch, args, make_decoder(model, args))[1])


def first_state(model, batch, args):
    """(x, key_mask, query) of a left-padded batch's first forward: the whole generation masked,
    the first block's positions queried."""
    ids, mask = core.left_pad(batch, model.pad_id)
    x = F.pad(ids, (0, args.gen_length), value=model.mask_id).to(model.device)
    key_mask = None if mask.all() else F.pad(mask, (0, args.gen_length), value=True).to(model.device)
    query = (ids.shape[1] + torch.arange(args.block_length, device=model.device)).expand(len(batch), -1)
    return x, key_mask, query


def bare_forward_ms(model, batch, args, n=16):
    """ms per forward of the network alone on the batch's first decoding state, the queries of one
    block as the decoder asks for them: what a decoder's own work is compared with."""
    x, key_mask, query = first_state(model, batch, args)
    model.logits(x, key_mask, None, query)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(n):
        model.logits(x, key_mask, None, query)
    sync(args.device)
    return 1000 * (time.perf_counter() - start) / n


def invariance(model, family, n, batch_size, args):
    """Greedy KLASS (llada-math thresholds) on n prompts alone and in left-padded batches:
    the fraction of identical generations and the per-row forward counts."""
    decoder = decoders.KlassDecoder(model.mask_id, conf_threshold=0.6, kl_threshold=0.01, variant="llada")
    samples = sorted(prompts(model, family, n, 1), key=len)

    alone = [decode(model, [p], args, decoder) for p in samples]
    together = [decode(model, samples[i:i + batch_size], args, decoder) for i in range(0, n, batch_size)]
    gens = [g for out in together for g in out[0]]
    steps = [s for out in together for s in out[1]]
    same = sum(g == a[0][0] for g, a in zip(gens, alone)) / n
    tokens = sum(t == u for g, a in zip(gens, alone) for t, u in zip(g, a[0][0])) / (n * args.gen_length)
    steps_alone, steps_together = sum(a[1][0] for a in alone) / n, sum(steps) / n
    print(f"{family} {str(model.dtype).split('.')[-1]} batch invariance: {100 * same:.0f}% of {n} generations "
          f"identical at B=1 vs B={min(batch_size, n)} ({100 * tokens:.1f}% of tokens); "
          f"avg_steps {steps_alone:.2f} vs {steps_together:.2f}", flush=True)
    return dict(model=family, dtype=str(model.dtype), identical_fraction=same, identical_tokens=tokens, n=n,
                batch=min(batch_size, n), avg_steps_alone=steps_alone, avg_steps_batched=steps_together)


def graph_error(model, family):
    """Max |logit| difference between the fast forward (compiled blocks, CUDA-graph replay) and eager."""
    x = torch.tensor(prompts(model, family, 2, 2)[0][:100], device=model.device)[None]
    captured, replayed = model(x).logits, model(x).logits
    graphed, model.forward = model.forward, partial(networks.forward_logits, model.net)
    eager = model(x).logits
    model.forward = graphed
    return max((captured - eager).abs().max().item(), (replayed - eager).abs().max().item())


KERNEL_KINDS = [("attention", ("flash", "fmha", "attention")), ("matmul", ("gemm", "nvjet", "cutlass", "xmma")),
                ("fused elementwise (compiled)", ("triton",))]


def kernel_kind(name):
    name = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in name for k in keys)), "other")


def profile(model, family, batch_size, args):
    """GPU kernel time of a batched decode (16 forwards) by kind, without graph replay so that
    every kernel is seen; the matmuls' own TFLOP/s is the ceiling for the bound fraction."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile
    (batch,) = label_batches(model, family, batch_size, 1)
    short = argparse.Namespace(**{**vars(args), "steps": 16})
    forward = model.forward
    model.forward = getattr(forward, "forward", forward)
    run(model, batch, short)  # compile outside the profile
    model.reset_counts()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run(model, batch, short)
        sync(args.device)
        seconds = time.perf_counter() - start
    model.forward = forward
    kernels = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0) + e.device_time_total / 1e6
    by_kind = {}
    for name, t in kernels.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0) + t
    busy = sum(by_kind.values())
    matmul_flops = model.padded_flops - model.attention_flops
    print(f"{family} B={batch_size} profile: {1000 * seconds / model.calls:.1f} ms per forward, GPU busy "
          f"{1000 * busy / model.calls:.1f} ms; " + ", ".join(f"{k} {100 * v / busy:.0f}%" for k, v in by_kind.items())
          + f"; matmuls run at {matmul_flops / by_kind.get('matmul', 1e-9) / 1e12:.0f} TFLOP/s", flush=True)
    for name, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {1000 * t / model.calls:8.2f} ms/forward  {kernel_kind(name):10.10s} {name[:100]}")
    return dict(model=family, batch=batch_size, profile_ms_per_forward=1000 * seconds / model.calls,
                busy_ms_per_forward=1000 * busy / model.calls, kernel_share={k: v / busy for k, v in by_kind.items()},
                matmul_tflops=matmul_flops / by_kind.get("matmul", 1e-9) / 1e12)


def width_sweep(model, family, batch_size, args):
    """Every batch shape of a full llada-math / dream-math run (all 500 prompt lengths sorted and cut
    into batches of batch_size, as run_eval does), forwarded twice each as a batch's first two forwards
    are: the first pays the shape's CUDA-graph capture (and any compilation), the second replays it.
    Per shape: both times and the GPU memory allocated and reserved after them."""
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    shapes = []
    for j, group in enumerate(length_groups(family, batch_size)):
        x, key_mask, query = first_state(model, random_prompts(model, group, j), args)
        seconds = []
        for _ in range(2):
            sync(args.device)
            start = time.perf_counter()
            model.logits(x, key_mask, None, query)
            sync(args.device)
            seconds.append(time.perf_counter() - start)
        memory = (torch.cuda.memory_allocated() / 2**30, torch.cuda.memory_reserved() / 2**30) \
            if args.device.startswith("cuda") else (None, None)
        shapes.append(dict(rows=len(group), width=x.shape[1], first_s=seconds[0], replay_ms=1000 * seconds[1],
                           allocated_gib=memory[0], reserved_gib=memory[1]))
    first = sum(r["first_s"] for r in shapes)
    extra = sum(r["first_s"] - r["replay_ms"] / 1000 for r in shapes)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(f"{family} B={batch_size} widths: {len(shapes)} shapes ({shapes[0]['width']}-{shapes[-1]['width']}), "
          f"first forwards {first:.1f} s in all, {extra:.1f} s over a replay; reserved GiB after the first / last "
          f"shape {shapes[0]['reserved_gib']} / {shapes[-1]['reserved_gib']}, peak allocated {peak}", flush=True)
    return dict(model=family, batch=batch_size, width_shapes=shapes, first_forward_seconds=first,
                capture_seconds_over_replay=extra, peak_allocated_gib=peak)


def bench(model, family, batch_size, args, cache, decoder="confidence_greedy"):
    args = argparse.Namespace(**{**vars(args), "cache": cache, "decoder": decoder})
    batches = label_batches(model, family, batch_size, args.samples)
    warm_up = argparse.Namespace(**{**vars(args), "steps": 4, "gen_length": 16, "block_length": 16})
    if model.block_size:  # a block model decodes in its own blocks
        args.block_length = warm_up.block_length = warm_up.gen_length = model.block_size
    run(model, batches[0], warm_up)
    model.reset_counts()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sample_forwards = 0
    sync(args.device)
    start = time.perf_counter()
    for batch in batches:
        sample_forwards += run(model, batch, args)
    sync(args.device)
    seconds = time.perf_counter() - start
    rate = sample_forwards / seconds
    calls = model.calls
    # a block model's forwards run against its cache: no bare forward of one state to compare with
    bare = None if model.block_size else sum(bare_forward_ms(model, batch, args) for batch in batches) / len(batches)
    return dict(model=family, batch=batch_size, cache=cache, decoder=decoder, samples=sum(map(len, batches)), temperature=args.temperature,
                top_p=args.top_p, ms_per_forward=1000 * seconds / calls, bare_ms_per_forward=bare,
                decode_over_bare=bare and 1000 * seconds / calls / bare, sample_forwards_per_s=rate, tflops=model.flops / seconds / 1e12,
                padding_share=1 - model.flops / model.padded_flops,
                bound_fraction=model.flops / seconds / PEAK,
                forwards_per_sample=sample_forwards / sum(map(len, batches)), block_length=args.block_length,
                tokens_per_s=sum(map(len, batches)) * args.gen_length / seconds,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
                projected_minutes=500 * args.steps / rate / 60)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llada,dream")
    p.add_argument("--model_path", help="benchmark this real model instead of random-weight shapes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_sizes", default="1,16")
    p.add_argument("--samples", type=int, default=4, help="batches per batch size (spread over the length quantiles)")
    p.add_argument("--gen_length", type=int, default=256)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--block_length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="the decoder's token choice (Dream: with top_p)")
    p.add_argument("--top_p", type=float)
    p.add_argument("--cache", dest="cache_modes", default="none", help="KV-cache modes to time, comma-separated: none, prefix, dual "
                   "(the CLI's --cache)")
    p.add_argument("--decoders", default="confidence_greedy", help="registered decoders to time, comma-separated "
                   "(ms per counted forward: a decoder's own work per forward beside the network's)")
    p.add_argument("--eager", action="store_true", help="plain eager forward (no compiled blocks, no CUDA graphs)")
    p.add_argument("--profile", action="store_true", help="also profile the largest batch size's kernels")
    p.add_argument("--invariance", type=int, default=0, help="also measure batch invariance on this many prompts")
    p.add_argument("--widths", action="store_true", help="also forward every batch shape of a full run at the largest "
                   "batch size: capture time and GPU memory per shape")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.profile and not args.device.startswith("cuda"):
        p.error("--profile measures GPU kernels: use it with a CUDA device")
    unknown = set(args.decoders.split(",")) - set(decoders.DECODERS)
    if unknown:
        p.error(f"--decoders: unknown {sorted(unknown)}; known: {', '.join(decoders.DECODERS)}")
    if not set(args.cache_modes.split(",")) <= set(kvcache.MODES):
        p.error(f"--cache takes {', '.join(kvcache.MODES)}, comma-separated; got {args.cache_modes!r}")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for shape in ([None] if args.model_path else args.shapes.split(",")):
        model = build(shape, args.model_path, args.device)
        if args.device.startswith("cuda") and not args.eager and not model.block_size:
            print(f"{model.name}: fast vs eager forward max |diff| of logits: {graph_error(model, model.name)}")
        if args.eager or not args.device.startswith("cuda"):
            model.forward, model.cache_forwards = networks.eager_forwards(model.net)
            model.block_layers = list(model.net.parts()[1])
        if args.invariance:
            rows.append(invariance(model, model.name, args.invariance, 8, args))
        modes = ["none"] if model.block_size else args.cache_modes.split(",")  # a block model: its exact cache
        for b, cache, name in itertools.product(map(int, args.batch_sizes.split(",")), modes, args.decoders.split(",")):
            rows.append(bench(model, model.name, b, args, cache, name))
            r = rows[-1]
            print(f"{r['model']:9s} B={r['batch']:3d} cache {cache:6s} {name:17s} n={r['samples']:4d}  "
                  f"{r['forwards_per_sample']:6.1f} forwards/sample  {r['tokens_per_s']:8.1f} tokens/s  "
                  f"peak {r['peak_gib'] or 0:5.1f} GiB  "
                  f"{r['ms_per_forward']:8.2f} ms/forward  {r['sample_forwards_per_s']:8.1f} sample-forwards/s  {r['tflops']:6.1f} TFLOP/s "
                  f"({100 * r['bound_fraction']:.0f}% of bound)  projected {r['projected_minutes']:.1f} min / 500 samples",
                  flush=True)
        if args.widths:
            rows.append(width_sweep(model, model.name, max(map(int, args.batch_sizes.split(","))), args))
        if args.profile:
            rows.append(profile(model, model.name, max(map(int, args.batch_sizes.split(","))), args))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    rows = [r for r in rows if "ms_per_forward" in r] + [r for r in rows if "ms_per_forward" not in r]  # table first
    env = dict(eager=args.eager, device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", torch=torch.__version__)
    print(json.dumps(env))
    if args.json:
        json.dump(dict(env=env, rows=rows), open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
