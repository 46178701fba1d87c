"""End-to-end benchmark: random-weight checkpoints on disk, label scripts run as a user runs them.

    python scripts/bench_e2e.py --json benchmarks/h200_e2e.json     # GPU: llada-math, dream-math, dream-humaneval
    python scripts/bench_e2e.py --labels llada-math --limit 64 --extra "--decoder klass --batch_size 16"
    python scripts/bench_e2e.py --shapes tiny --limit 2 --device cpu  # CPU smoke test of the same path
    python scripts/bench_e2e.py --labels llada-moe-math --limit 16      # LLaDA-MoE-7B-A1B at its real shapes
    python scripts/bench_e2e.py --labels sdar-math,trado-math,fast-dllm-v2-math,llada2-mini-math --limit 32

Per model family, in the order --labels first names them, the script
1. writes a random-weight checkpoint in the hub's on-disk layout to <workdir>/<family>-<shapes>: the
   real config.json; bf16 safetensors sharded exactly per the real model.safetensors.index.json
   (tests/fixtures/model_files), each shard generated on --device (randn * 0.02, norms 1), moved to
   the CPU and written with save_file before the next one is made; Dream's real tokenizer files; for
   LLaDA a stand-in tokenizer with LLaDA's 126,349 ids: Qwen2's byte-level BPE (Dream's vocab.json /
   merges.txt) cut to its first 126,080 tokens, then LLaDA's added tokens at their ids
   (<|startoftext|> 126080, <|endoftext|> 126081, <|mdm_mask|> 126336, <|start_header_id|> 126346,
   <|end_header_id|> 126347, <|eot_id|> 126348, the reserved ones) and LLaDA's chat template. It gives
   the MATH-500 prompts exactly the token counts of data/math500_prompt_lengths.json, so forwards
   have the lengths of a real run;
2. runs each of its labels' scripts as a subprocess, as a user does: `MODEL_PATH=<checkpoint>
   LIMIT=<limit> bash scripts/<label>.sh --results_dir <workdir>/results --device <device> <extra>`,
   its output in <workdir>/<label>.log;
3. deletes the checkpoint (unless --keep) before the next family's: the real ones are 16.0 GB
   (LLaDA) and 15.2 GB (Dream).

Reported per label (a table on stdout; --json also writes it with the checkpoints and environment):
- s/sample, the steady state: the `seconds` of the samples.jsonl records (their batch's decode and
  judge time over its size) averaged over every batch but the first; records of one batch share a
  seed (the run seed + the index of the batch's first sample);
- warm-up: wall-clock time from the process start to the first batch's records in samples.jsonl
  (polled every 0.1 s), less that batch's size times s/sample: imports, data, checkpoint load and
  the first batch's compilation and CUDA-graph captures;
- peak GPU GB: summary.json's environment.gpu_peak_memory_gb ("n/a" where absent);
- wall s: the whole subprocess; decoder and avg_steps from summary.json. Random weights give
  near-uniform logits, so a decoder that stops early on confidence behaves otherwise than on the
  real models: read each row together with its decoder and avg_steps;
- width, us/token-fwd: the steady batches' mean padded width (prompt + generation) and their
  seconds per row, forward and padded position;
- projected min for the full label = (warm-up + the full run's seconds) / 60, where the full run
  is priced at the steady us/token-fwd: its n_full samples (500 MATH, 1319 GSM8K, 164 HumanEval) with
  their prompt lengths under the checkpoint's tokenizer, sorted and batched as the CLI does, each
  batch rows x avg_steps x padded width ("full width" is the mean). The first --limit samples are
  not a sample of the label's lengths (on llada-math at --limit 24 the steady batches are 531
  positions wide on average, a full run's 387), so their s/sample alone would not project it.
The default --limit 16 is two batches of 8 per label (one warm-up, one steady); larger limits give
more steady batches but, at about 2.4 s per sample at B=8, --limit 64 on three labels takes longer
than 10 minutes: then run the families as separate commands.

LLaDA-MoE (labels llada-moe-*): its reconstructed config.json (tests/fixtures/model_files), the
official tensor names (one tensor per expert) in 3 shards as the hub has them (no real index is
here), and a stand-in tokenizer with its 157,184 ids: Qwen2's BPE (Dream's files) below id 151643,
reserved placeholders above, Ling's EOS <|endoftext|> 156892 and mask <|mask|> 156895 (the config's
and the model card's ids), <role>, </role>, <|role_end|> at 156896-156898 (placeholder ids) and
Ling's chat format; prompt token counts are therefore Qwen2's, not Ling's.

Block-diffusion models (labels sdar-*, trado-*, fast-dllm-v2-*, llada2-mini-*; docs/models.md): one
checkpoint per architecture, in the order the labels name them: SDAR-4B-Chat's shapes for sdar-* and
trado-* (TraDo-4B-Instruct is SDAR-4B-Chat trained further; 8.8 GB) and Fast_dLLM_v2_7B's (15.2 GB),
both with their real config.json and sharded exactly per their real index; LLaDA2.0-mini (32.5 GB)
from its reconstructed config.json under the official names (one tensor per expert, the routers'
expert_bias buffers as bf16 zeros) in 7 shards of at most about 5 GB (no real index is here: the
shard size save_pretrained writes by default). Tokenizers: SDAR / TraDo and Fast-dLLM v2 get
Qwen2.5's vocabulary (Dream's vocab.json, merges.txt) with the checkpoint's own tokenizer_config.json
(SDAR-4B-Chat's for TraDo too), SDAR's also saved as tokenizer.json, which the LLaDA family's loader
reads; LLaDA2.0-mini gets LLaDA-MoE's stand-in Ling tokenizer, whose 157,184 ids, EOS 156892 and mask
156895 are LLaDA2.0-mini's. These models compute about one block per forward through their exact
cache, so their us/token-fwd (per padded position of the batch, as for the others) is a price for
comparing runs, and the projection assumes the cost grows with the width as it does for full forwards.

--shapes tiny writes checkpoints of the same families, vocabularies and tokenizers, but 2 layers of
width 64, sharded in the index's style (model-0000k-of-0000n.safetensors, at most as many shards as
the real index) from the parameter names of networks.py's network for that config; its default
--extra (batch 1, gen / steps / block 16, greedy) runs three labels of 2 samples on 2 CPU cores in
about a minute.
"""
import argparse
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import custom_demask_eval as cde  # noqa: E402
from demask import networks  # noqa: E402
from demask import tasks  # noqa: E402

MODEL_FILES = os.path.join(REPO, "tests", "fixtures", "model_files")
REAL_FOLDERS = {"llada": "llada-8b-instruct", "dream": "dream-v0-instruct-7b", "llada_moe": "llada-moe-7b-a1b-instruct",
                "sdar": "sdar-4b-chat", "fast_dllm_qwen": "fast_dllm_v2_7b", "llada2_moe": "llada2.0-mini"}
# Label's hub id -> its checkpoint's architecture (networks.py); TraDo-4B has SDAR-4B's shapes and files
FAMILIES = {cde.LLADA: "llada", cde.DREAM: "dream", cde.LLADA_MOE: "llada_moe", cde.SDAR: "sdar", cde.TRADO: "sdar",
            cde.FAST_DLLM_V2: "fast_dllm_qwen", cde.LLADA2_MINI: "llada2_moe"}
HUB_SHARDS = {"llada_moe": 3, "llada2_moe": 7}  # shards of a checkpoint whose real index is not in model_files
ZERO_BUFFERS = ("expert_bias",)  # saved buffers written as zeros (LLaDA2.0's router bias starts at zero)
QWEN_VOCAB_FILES = ("vocab.json", "merges.txt")
DREAM_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json",
                         "special_tokens_map.json")
TINY_SIZES = {
    "llada": dict(d_model=64, n_heads=4, n_kv_heads=4, mlp_hidden_size=128, n_layers=2),
    "dream": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=2),
    "llada_moe": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, num_experts=8,
                      num_experts_per_tok=2, expert_intermediate_size=32, moe_layer_freq=[1, 1]),
    "sdar": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                 num_hidden_layers=2),
    "fast_dllm_qwen": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                           num_hidden_layers=2, layer_types=["full_attention"] * 2),
    "llada2_moe": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                       intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, n_group=2,
                       topk_group=1),
}
LING_TOKENS = {156892: "<|endoftext|>", 156895: "<|mask|>", 156896: "<role>", 156897: "</role>", 156898: "<|role_end|>"}
LING_TEMPLATE = ("{% for m in messages %}<role>{{ {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'}"
                 "[m['role']] }}</role>{{ m['content'] }}<|role_end|>{% endfor %}<role>ASSISTANT</role>")
DEFAULT_EXTRA = {"real": "--decoder confidence_greedy --batch_size 8",
                 "tiny": "--decoder confidence_greedy --batch_size 1 --gen_length 16 --steps 16 --block_length 16 "
                         "--temperature 0 --top_p 1"}
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
POLL_S = 0.1

# ---------------------------------------------------------------------------
# Configs and the shard plan


def real_file(family, name):
    return os.path.join(MODEL_FILES, REAL_FOLDERS[family], name)


def model_config(family, shapes):
    config = json.load(open(real_file(family, "config.json")))
    return {**config, **TINY_SIZES[family]} if shapes == "tiny" else config


def parameter_shapes(family, config):
    """{name: (shape, fill)} of networks.py's network for `config`, built on the meta device, under the
    checkpoint's names (stacked experts as one tensor per expert); fill is "ones" for norms, "zeros"
    for ZERO_BUFFERS, else "randn"."""
    with torch.device("meta"):
        net = networks.network_class(family)(config)
    norms = {f"{name}.weight" for name, m in net.named_modules() if isinstance(m, networks.RMSNorm)}
    shapes = {}
    for key, value in net.state_dict().items():
        head, _, name = key.rpartition(".")
        if head.endswith("mlp.experts"):
            shapes.update({f"{head}.{j}.{name}.weight": (tuple(value.shape[1:]), "randn") for j in range(value.shape[0])})
        else:
            fill = "ones" if key in norms else "zeros" if name in ZERO_BUFFERS else "randn"
            shapes[key] = (tuple(value.shape), fill)
    return shapes


def shard_keys(sizes, n):
    """Keys in order, cut into at most n contiguous shards of about equal bytes, named as the hub names them."""
    total, done, shards = sum(sizes.values()), 0, [[] for _ in range(n)]
    for key, size in sizes.items():
        shards[min(n - 1, done * n // total)].append(key)
        done += size
    shards = [s for s in shards if s]
    return {key: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards) for key in s}


def shard_plan(family, config, shapes):
    """The index {metadata, weight_map}: the real index for the real config, else the scaled
    network's own names sharded in the same style into as many files (HUB_SHARDS where no real
    index is shipped)."""
    sizes = {k: 2 * torch.Size(shape).numel() for k, (shape, _) in shapes.items()}  # bf16
    if family in HUB_SHARDS:
        n = HUB_SHARDS[family]
    else:
        real = json.load(open(real_file(family, "model.safetensors.index.json")))
        if config == model_config(family, "real"):
            if set(real["weight_map"]) != set(sizes) or real["metadata"]["total_size"] != sum(sizes.values()):
                raise SystemExit(f"{family}: networks.py's parameters do not match the real index")
            return real
        n = len(set(real["weight_map"].values()))
    return dict(metadata=dict(total_size=sum(sizes.values())), weight_map=dict(sorted(shard_keys(sizes, n).items())))

# ---------------------------------------------------------------------------
# Writing a checkpoint


def random_tensor(shape, fill, device):
    if fill == "randn":
        return torch.randn(shape, dtype=torch.bfloat16, device=device).mul_(0.02)
    return getattr(torch, fill)(shape, dtype=torch.bfloat16, device=device)


def write_weights(folder, shapes, index, device):
    """Each shard generated on `device`, moved to the CPU and written; one shard in memory at a time."""
    from safetensors.torch import save_file
    files = sorted(set(index["weight_map"].values()))
    for name in files:
        keys = [k for k in shapes if index["weight_map"][k] == name]
        shard = {k: random_tensor(*shapes[k], device).cpu() for k in keys}
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        del shard
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return files


def llada_tokenizer():
    """A stand-in with LLaDA's ids: Qwen2's BPE below LLaDA's first added token, the added tokens
    of LLaDA's tokenizer_config.json at their ids, LLaDA's special-token names and chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    import transformers
    llada = json.load(open(real_file("llada", "tokenizer_config.json")))
    added = {int(i): t for i, t in llada["added_tokens_decoder"].items()}
    first = min(added)
    qwen = json.load(open(real_file("dream", "vocab.json")))
    vocab = {t: i for t, i in qwen.items() if i < first}
    with open(real_file("dream", "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.rstrip("\n").split(" ")) for line in f if not line.startswith("#version")]
    merges = [m for m in merges if m[0] + m[1] in vocab]
    vocab.update({t["content"]: i for i, t in added.items()})
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise SystemExit("stand-in LLaDA tokenizer: ids are not contiguous")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t["content"], special=t["special"], normalized=False)
                            for _, t in sorted(added.items())])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=llada["bos_token"], eos_token=llada["eos_token"],
        pad_token=llada["pad_token"], chat_template=llada["chat_template"], clean_up_tokenization_spaces=False)


def ling_tokenizer():
    """LLaDA-MoE's stand-in (module docstring): Qwen2's BPE, placeholders, Ling's tokens at LING_TOKENS."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    import transformers
    qwen = json.load(open(real_file("dream", "vocab.json")))
    first, size = 151643, model_config("llada_moe", "real")["vocab_size"]
    vocab = {t: i for t, i in qwen.items() if i < first}
    with open(real_file("dream", "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(line.rstrip("\n").split(" ")) for line in f if not line.startswith("#version")]
    merges = [m for m in merges if m[0] + m[1] in vocab]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(LING_TOKENS.get(i, f"<|placeholder_{i}|>"), special=True, normalized=False)
                            for i in range(first, size)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mask|>",
        chat_template=LING_TEMPLATE, clean_up_tokenization_spaces=False)


def qwen_tokenizer(folder, family):
    """Qwen2.5's vocabulary (Dream's vocab.json / merges.txt) with the checkpoint's own tokenizer_config.json;
    SDAR's also as tokenizer.json, which its checkpoint ships and the LLaDA family's loader reads."""
    for name in QWEN_VOCAB_FILES:
        shutil.copy(real_file("dream", name), folder)
    shutil.copy(real_file(family, "tokenizer_config.json"), folder)
    if family == "sdar":
        networks.load_tokenizer(folder, "dream").save_pretrained(folder)


def write_tokenizer(folder, family):
    if family == "llada":
        llada_tokenizer().save_pretrained(folder)
    elif family in ("llada_moe", "llada2_moe"):
        ling_tokenizer().save_pretrained(folder)
    elif family in ("sdar", "fast_dllm_qwen"):
        qwen_tokenizer(folder, family)
    else:
        for name in DREAM_TOKENIZER_FILES:
            shutil.copy(real_file(family, name), folder)


def write_checkpoint(folder, family, shapes_mode, device, seed):
    """The checkpoint folder (config, index, shards, tokenizer); returns what was written and how long it took."""
    start = time.time()
    config = model_config(family, shapes_mode)
    shapes = parameter_shapes(family, config)
    index = shard_plan(family, config, shapes)
    shutil.rmtree(folder, ignore_errors=True)
    free = shutil.disk_usage(os.path.dirname(folder)).free
    if free < 1.05 * index["metadata"]["total_size"]:
        raise SystemExit(f"{family}: {index['metadata']['total_size'] / 1e9:.1f} GB to write, "
                         f"{free / 1e9:.1f} GB free under {os.path.dirname(folder)}")
    os.makedirs(folder)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"), indent=2)
    json.dump(index, open(os.path.join(folder, "model.safetensors.index.json"), "w"), indent=2)
    torch.manual_seed(seed)
    files = write_weights(folder, shapes, index, device)
    write_tokenizer(folder, family)
    seconds = time.time() - start
    print(f"{family}: wrote {len(files)} shards, {index['metadata']['total_size'] / 1e9:.2f} GB bf16, "
          f"in {seconds:.1f} s ({folder})", flush=True)
    return dict(path=folder, shapes=shapes_mode, shards=len(files), bytes=index["metadata"]["total_size"],
                write_seconds=round(seconds, 2))

# ---------------------------------------------------------------------------
# Running a label and reading its run directory


def label_family(label):
    family = FAMILIES.get(cde.LABELS[label].model if label in cde.LABELS else None)
    if family is None:
        raise SystemExit(f"{label!r}: not a label of LLaDA-8B-Instruct, Dream-v0-Instruct-7B, LLaDA-MoE-7B-A1B-Instruct, "
                         "SDAR-4B-Chat, TraDo-4B-Instruct, Fast_dLLM_v2_7B or LLaDA2.0-mini")
    return family


def label_samples(label):
    return tasks.TASKS[cde.LABELS[label].task]().load(cde.LABELS[label])


def run_files(results, label):
    return glob.glob(os.path.join(results, label, "*", "samples.jsonl"))


def python_shim(workdir):
    """A folder whose `python` runs this interpreter, put first on the scripts' PATH: the label
    scripts call `python`, which a machine may lack (only python3) or resolve to another one."""
    folder = os.path.join(workdir, "bin")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "python")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    os.chmod(path, 0o755)
    return folder


def run_script(label, model_dir, results, args, log):
    """The label's script as a user runs it; returns (exit code, s to the first batch written or None, wall s)."""
    script = os.path.join(REPO, "scripts", label.replace("-", "_") + ".sh")
    env = dict(os.environ, MODEL_PATH=model_dir, LIMIT=str(args.limit), HF_HUB_OFFLINE="1",
               PATH=python_shim(args.workdir) + os.pathsep + os.environ.get("PATH", ""))
    command = ["bash", script, "--results_dir", results, "--device", args.device, *shlex.split(args.extra)]
    first = None
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if first is None and any(os.path.getsize(p) for p in run_files(results, label)):
                first = time.time() - start
            time.sleep(POLL_S)
    return proc.returncode, first, time.time() - start


def batches(records):
    """Records grouped into their batches (consecutive records of one seed)."""
    groups = []
    for r in records:
        if groups and groups[-1][0]["seed"] == r["seed"]:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def timing(records, first_done, widths, full_widths):
    """Steady s/sample (all batches but the first), warm-up s and projected minutes (None where unknown).

    A forward costs about the same per row and padded position at every width (measured on one
    H200: 22.5-23.8 us per token-forward at widths 341-646, LLaDA-8B, B=8), so the projection
    prices the full run's batches (`full_widths`: every batch's rows and padded width, as the CLI
    sorts and batches the whole label) at the steady batches' seconds per row-forward-position
    (`widths`: the padded width of each record's batch). The first samples of a label are not a
    sample of its lengths, so their s/sample alone would not project the full run."""
    groups = batches(records)
    rest = [r for g in groups[1:] for r in g]
    full_positions = sum(n * w for n, w in full_widths)
    row = dict(first_batch_done_s=rounded(first_done, 2), first_batch_size=len(groups[0]) if groups else 0,
               steady_samples=len(rest), full_mean_width=rounded(full_positions / sum(n for n, _ in full_widths), 1),
               steady_s_per_sample=None, warmup_s=None, us_per_token_forward=None, mean_width=None, projected_min=None)
    if not rest:
        return row
    seconds = sum(r["seconds"] for r in rest)
    steady = seconds / len(rest)
    per_token = seconds / sum(r["steps"] * widths[r["id"]] for r in rest)
    steps = sum(r["steps"] for r in rest) / len(rest)
    row.update(steady_s_per_sample=rounded(steady, 4), us_per_token_forward=rounded(per_token * 1e6, 3),
               mean_width=rounded(sum(widths[r["id"]] for r in rest) / len(rest), 1))
    if first_done is not None:
        warm = first_done - len(groups[0]) * steady
        row.update(warmup_s=rounded(warm, 2), projected_min=rounded((warm + per_token * steps * full_positions) / 60, 2))
    return row


def padded_widths(lengths, ids, batch_size, gen_length):
    """{id: padded width of its batch} and [(rows, width)] per batch when the CLI decodes the
    samples `ids` (prompt lengths `lengths`): sorted by prompt length, cut into batches."""
    order = sorted(ids, key=lambda i: lengths[i])
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batch_widths = [(g, max(lengths[j] for j in g) + gen_length) for g in groups]
    return {i: w for g, w in batch_widths for i in g}, [(len(g), w) for g, w in batch_widths]


def prompt_lengths(label, checkpoint):
    """{sample id: prompt tokens} of the whole label, encoded as the CLI encodes them."""
    family = networks.FAMILIES[label_family(label)]
    model = SimpleNamespace(tokenizer=networks.load_tokenizer(checkpoint, family), family=family)
    return {s["id"]: len(tasks.encode_prompt(model, s)) for s in label_samples(label)}


def rounded(value, digits):
    return None if value is None else round(value, digits)


def bench_label(label, checkpoint, args):
    results = os.path.join(args.workdir, "results")
    log = os.path.join(args.workdir, f"{label}.log")
    shutil.rmtree(os.path.join(results, label), ignore_errors=True)
    print(f"{label}: running (log {log})", flush=True)
    rc, first_done, wall = run_script(label, checkpoint, results, args, log)
    row = dict(label=label, rc=rc, wall_s=round(wall, 2), log=log, extra=args.extra)
    files = run_files(results, label)
    if rc != 0 or len(files) != 1:
        tail = open(log).read().splitlines()[-15:]
        print(f"{label}: FAILED (exit {rc}); last lines of {log}:\n  " + "\n  ".join(tail), flush=True)
        return dict(row, error=f"exit {rc}")
    run_dir = os.path.dirname(files[0])
    records = [json.loads(line) for line in open(files[0])]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    cfg = summary["config"]
    task = tasks.TASKS[cfg["task"]]
    lengths = prompt_lengths(label, checkpoint)
    widths, _ = padded_widths(lengths, [r["id"] for r in records], cfg["batch_size"], cfg["gen_length"])
    _, full_widths = padded_widths(lengths, list(lengths), cfg["batch_size"], cfg["gen_length"])
    row.update(n_full=len(lengths), run_dir=run_dir, model=cfg["model"], decoder=summary["decoder"],
               batch_size=cfg["batch_size"], n=len(records), avg_steps=summary["metrics"]["avg_steps"],
               metric=task.final, metric_value=summary["metrics"][task.final],
               peak_gpu_gb=summary.get("environment", {}).get("gpu_peak_memory_gb"),
               **timing(records, first_done, widths, full_widths))
    print(format_row(row), flush=True)
    return row

# ---------------------------------------------------------------------------
# Report


COLUMNS = [("label", "label", "{}"), ("decoder", "decoder", "{}"), ("B", "batch_size", "{}"), ("n", "n", "{}"),
           ("avg_steps", "avg_steps", "{:.1f}"), ("s/sample", "steady_s_per_sample", "{:.3f}"),
           ("width", "mean_width", "{:.0f}"), ("us/token-fwd", "us_per_token_forward", "{:.2f}"),
           ("warm-up s", "warmup_s", "{:.1f}"), ("peak GPU GB", "peak_gpu_gb", "{:.1f}"),
           ("wall s", "wall_s", "{:.1f}"), ("full n", "n_full", "{}"), ("full width", "full_mean_width", "{:.0f}"),
           ("projected min", "projected_min", "{:.1f}")]


def cells(row):
    if "error" in row:
        return [row["label"], f"FAILED ({row['error']})"] + [""] * (len(COLUMNS) - 2)
    return [fmt.format(row[key]) if row.get(key) is not None else "n/a" for _, key, fmt in COLUMNS]


def format_row(row):
    return "  ".join(f"{h}={c}" for (h, _, _), c in zip(COLUMNS, cells(row)))


def table(rows):
    lines = [[h for h, _, _ in COLUMNS]] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines)


def environment(args):
    import transformers
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    return dict(device=args.device, gpu=gpu, torch=torch.__version__, transformers=transformers.__version__,
                shapes=args.shapes, limit=args.limit, extra=args.extra, labels=args.labels)


def write_json(path, env, checkpoints, rows):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        json.dump(dict(env=env, checkpoints=checkpoints, rows=rows), open(path, "w"), indent=2)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default="llada-math,dream-math,dream-humaneval",
                   help="comma-separated labels of LLaDA-8B, Dream-7B, LLaDA-MoE or the block-diffusion models, "
                        "grouped by checkpoint in this order")
    p.add_argument("--limit", type=int, default=16, help="samples per label (LIMIT)")
    p.add_argument("--extra", help="arguments passed to every label script; one flag alone: --extra=--flag (default: "
                   + "; ".join(f"{k}: {v!r}" for k, v in DEFAULT_EXTRA.items()) + ")")
    p.add_argument("--shapes", choices=["real", "tiny"], default="real",
                   help="the real models' shapes, or tiny ones for a CPU smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the weights are generated; also passed to the labels")
    p.add_argument("--workdir", default="/tmp/e2e", help="checkpoints, run directories and logs")
    p.add_argument("--json", help="also write the table, checkpoints and environment here")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete each after its labels)")
    args = p.parse_args(argv)
    args.extra = DEFAULT_EXTRA[args.shapes] if args.extra is None else args.extra
    return args


def main(argv=None):
    args = parse_args(argv)
    labels = args.labels.split(",")
    families = list(dict.fromkeys(label_family(label) for label in labels))
    os.makedirs(args.workdir, exist_ok=True)
    env, checkpoints, rows = environment(args), {}, []
    for family in families:
        folder = os.path.join(args.workdir, f"{family}-{args.shapes}")
        try:
            checkpoints[family] = write_checkpoint(folder, family, args.shapes, args.device, args.seed)
            for label in (label for label in labels if label_family(label) == family):
                rows.append(bench_label(label, folder, args))
                write_json(args.json, env, checkpoints, rows)
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    print(table(rows))
    write_json(args.json, env, checkpoints, rows)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
