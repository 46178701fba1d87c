"""demask-eval: evaluate demasking (decoding) strategies of masked diffusion LMs.

Edit `DemaskDecoder` inside the editable region below, then run a label, e.g.
    python custom_demask_eval.py --label tiny-math          # bundled tiny model, CPU, offline
    python custom_demask_eval.py --label llada-math         # LLaDA-8B-Instruct on a GPU
    python custom_demask_eval.py report results/            # leaderboard and Pareto plots
This file, in the order data flows: the editable region -> labels (one table) -> the evaluation
loop with run directories and processes -> run identity -> sweeps and seeds -> command line. The
library lives in the package demask/: the decode core (model handle, forward counting, rule checks)
in demask/core.py, the reference decoders and the method registry in demask/decoders.py, the tasks
in demask/tasks.py, the report in demask/report.py; KLASS's judging is utils.py.
"""
if __name__ == "__main__":  # run as a script: run the importable module, so the code has one name
    import custom_demask_eval
    custom_demask_eval.main()
    raise SystemExit(0)

import argparse
import datetime
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from demask import REPO, blockcache, kvcache, networks, parallelbench, report, sandbox, trajectories
from demask import policy  # noqa: F401 (registers the policy decoder)
# Re-exported for pasted decoders, plugins and tools, which import them from this module.
from demask.core import (DecoderModel, DiffusionLM, RuleChecker, RuleViolation, batch_model,  # noqa: F401
                         check_reachable, checked_output, cut_at_stop, decode_batch, decode_rows, judge_batch, left_pad, load_model,
                         stop_ids)
from demask.decoders import (DECODERS, POSITION_SCORES, BlockDecoder, KlassDecoder, TopKDecoder,  # noqa: F401
                             add_gumbel_noise, build_decoder, choosable, clean_confidence, current_block,
                             decoder_parameters, describe_decoder, get_num_transfer_tokens, propose_tokens, register_method,
                             register_position_score, top_k_commit)
from demask.records import json_line, merge_samples, parse_samples_file, read_records, rewrite
from demask.settings import RUN_KEYS, RunSettings
from demask.tasks import TASKS, InputError, encode_prompt
from demask.verdicts import read_checked, rederived_run_metrics


# --- EDITABLE REGION START ---
# The contract. decode(model, input_ids, gen_length, steps, block_length) -> (x, used_steps).
# input_ids [B, P] long (B > 1 only when the class sets `batched = True`; rows are then left-padded
# and the padding is masked for you); x [B, P + gen_length] long with no mask_id left.
# model(x).logits[b, i]: fp32 prediction for token i of row b (Dream's shift is applied inside);
# model(x, query_idx=idx) returns only positions idx [B, Q] (cheaper). Also model.device,
# model.mask_id, model.stop_ids, model.tokenizer, model.config, model.family.
# Every model(x) is counted at the model (avg_steps) and checked: prompt unchanged, committed tokens
# final (set `remasks = True` to re-mask), blocks in order, integer ids inside the vocabulary,
# progress (x changes within gen_length + steps forwards), and the returned (x, int) pair.
# In scope: torch, F, np, get_num_transfer_tokens(mask, steps), add_gumbel_noise(logits, T).
# Reference rules to copy from: demask/decoders.py (KlassDecoder, TopKDecoder, ...).
class DemaskDecoder:
    """KLASS (Kim et al., arXiv 2511.05664; shkim0116/KLASS src/model/llada_klass.py), LLaDA version.

    Per step: a masked position of the active block is ready when its confidence is above
    conf_threshold and its KL divergence to the previous step's distribution stayed below
    kl_threshold for the last history_length steps; all ready positions are committed.
    When nothing is ready, the uniform top-k schedule commits the most confident positions.
    Every row of the batch works on its own earliest unfinished block.
    """
    batched = True
    # How runs and the report name and describe this class (docs/decoders.md): without a `name` the
    # report calls each version of this region default@<code hash> (date); give a variant its own.
    # name = "my_rule"
    method_type = "adaptive"
    representative_param = "conf_threshold"
    position_score = "confidence"
    summary = "KL-stable and confident positions, else schedule top-k (KLASS, LLaDA version)"

    def __init__(self, mask_id, temperature=0.0, conf_threshold=0.9, kl_threshold=0.01, history_length=2):
        self.mask_id = mask_id
        self.temperature = temperature
        self.conf_threshold = conf_threshold
        self.kl_threshold = kl_threshold
        self.history_length = history_length

    @torch.no_grad()
    def decode(self, model, input_ids, gen_length, steps, block_length):
        B, P = input_ids.shape
        x = F.pad(input_ids.to(model.device), (0, gen_length), value=self.mask_id)
        steps_per_block = steps // (gen_length // block_length)
        block_of = torch.arange(gen_length, device=x.device) // block_length
        current = torch.full((B,), -1, device=x.device)
        step_in_block = torch.zeros(B, dtype=torch.long, device=x.device)
        schedule = torch.zeros(B, steps_per_block, dtype=torch.long, device=x.device)
        p_prev, used_steps = torch.zeros((), dtype=torch.float64, device=x.device), 0
        history = torch.zeros(B, gen_length, self.history_length, dtype=torch.float64, device=x.device)
        while (x[:, P:] == self.mask_id).any():
            # each row's active block: its earliest block with masks; entering it resets the schedule
            masked = x[:, P:] == self.mask_id
            block = torch.where(masked.any(1), masked.float().argmax(1) // block_length, current)
            in_block = masked & (block_of[None] == block[:, None])
            entered = block != current
            schedule[entered] = get_num_transfer_tokens(in_block[entered], steps_per_block)
            step_in_block[entered] = 0
            current = block

            # one forward: proposed tokens, their confidence, and the KL to the previous step
            logits = model(x).logits[:, P:]
            p = F.softmax(logits.to(torch.float64), dim=-1)
            tokens = torch.argmax(add_gumbel_noise(choosable(logits, model), self.temperature), dim=-1)
            conf = torch.gather(p, -1, tokens[..., None]).squeeze(-1)
            kl = (p * (torch.log(p + 1e-12) - torch.log(p_prev + 1e-12))).sum(-1)
            history = torch.cat([history[..., 1:], kl[..., None]], dim=-1)
            p_prev = p

            # ready = KL-stable for history_length steps and confident; else the schedule's top-k
            warm = (step_in_block >= self.history_length - 1)[:, None]
            stable = warm & (history < self.kl_threshold).all(-1)
            ready = in_block & stable & (conf > self.conf_threshold)
            k = schedule.gather(1, step_in_block.clamp(max=steps_per_block - 1)[:, None]).squeeze(1)
            k = torch.minimum(k.clamp(min=1), in_block.sum(1))
            score = torch.where(in_block, conf, -torch.inf)
            rank = torch.argsort(torch.argsort(score, dim=1, descending=True, stable=True), dim=1)
            fallback = in_block & (rank < k[:, None])

            # commit
            commit = torch.where(ready.any(1, keepdim=True), ready, fallback)
            x[:, P:] = torch.where(commit, tokens, x[:, P:])
            step_in_block += 1
            used_steps += 1
        return x, used_steps
# --- EDITABLE REGION END ---


register_method("default", DemaskDecoder, reference="this file's editable region")  # described by the class


def editable_region_source():
    """The text between the region's fence lines, as this module was loaded."""
    text = open(os.path.abspath(__file__)).read()
    return text.split("# --- EDITABLE REGION START ---", 1)[1].split("# --- EDITABLE REGION END ---", 1)[0]


EDITABLE_SOURCE = editable_region_source()

# ---------------------------------------------------------------------------
# Labels: one line each. LLaDA/Dream settings follow KLASS (arXiv 2511.05664, its run scripts);
# batch None = 8 on a GPU for batched decoders, else 1; limit None = every sample.

LLADA, DREAM = "GSAI-ML/LLaDA-8B-Instruct", "Dream-org/Dream-v0-Instruct-7B"
LLADA15, LLADA_BASE, LLADA_MOE = "GSAI-ML/LLaDA-1.5", "GSAI-ML/LLaDA-8B-Base", "inclusionAI/LLaDA-MoE-7B-A1B-Instruct"
DREAM_CODER, DIFFUCODER = "Dream-org/Dream-Coder-v0-Instruct-7B", "apple/DiffuCoder-7B-Instruct"
TINY = os.path.join(REPO, "models", "tiny-llada")
C4, TINY_TEXT = "data/c4_continuation.jsonl", "data/tiny_text_test.jsonl"
GSM8K, MBPP = "data/gsm8k_test.jsonl", "data/mbpp_test.jsonl"
LABEL_FIELDS = ("model", "task", "data", "gen_length", "steps", "block_length", "temperature", "top_p",
                "conf_threshold", "kl_threshold", "history_length", "scorer", "batch_size", "limit")
LABELS = {row[0]: RunSettings(label=row[0], **dict(zip(LABEL_FIELDS, row[1:]))) for row in [
    # label            model  task         data                         gen  steps block temp top_p conf  kl     hist scorer          batch limit
    ("llada-math",      LLADA, "math",      "data/math_test.json",       256, 256,  64,   0.0, None, 0.6,  0.01,  2,   None,           None, None),
    ("llada-humaneval", LLADA, "humaneval", "human-eval",                256, 256,  64,   0.0, None, 0.9,  0.01,  2,   None,           None, None),
    ("dream-math",      DREAM, "math",      "data/math_test.json",       256, 256,  256,  0.2, 0.95, 0.9,  0.005, 2,   None,           None, None),
    ("dream-humaneval", DREAM, "humaneval", "human-eval",                256, 256,  256,  0.2, 0.95, 0.8,  0.001, 2,   None,           None, None),
    ("llada-gsm8k",     LLADA, "gsm8k",     GSM8K,                       256, 256,  64,   0.0, None, 0.6,  0.015, 2,   None,           None, None),
    ("llada-mbpp",      LLADA, "mbpp",      MBPP,                        256, 256,  64,   0.0, None, 0.7,  0.01,  2,   None,           None, None),
    ("dream-gsm8k",     DREAM, "gsm8k",     GSM8K,                       256, 256,  256,  0.2, 0.95, 0.9,  0.001, 2,   None,           None, None),
    ("dream-mbpp",      DREAM, "mbpp",      MBPP,                        256, 256,  256,  0.2, 0.95, 0.9,  0.001, 2,   None,           None, None),
    ("dream-text",      DREAM, "text",      C4,                          224, 256,  224,  0.0, None, 0.9,  0.01,  2,   "gpt2-large",   None, None),
    ("llada-16step",    LLADA, "text",      C4,                          224, 16,   224,  0.0, None, 0.9,  0.01,  2,   "gpt2-large",   None, None),
    ("llada-64step",    LLADA, "text",      C4,                          224, 64,   224,  0.0, None, 0.9,  0.01,  2,   "gpt2-large",   None, None),
    ("llada-256step",   LLADA, "text",      C4,                          224, 256,  224,  0.0, None, 0.9,  0.01,  2,   "gpt2-large",   None, None),
    ("dream-8step",     DREAM, "text",      C4,                          224, 8,    224,  0.0, None, 0.9,  0.01,  2,   "gpt2-large",   None, None),
    ("dream-16step",    DREAM, "text",      C4,                          224, 16,   224,  0.0, None, 0.9,  0.01,  2,   "gpt2-large",   None, None),
    ("dream-64step",    DREAM, "text",      C4,                          224, 64,   224,  0.0, None, 0.9,  0.01,  2,   "gpt2-large",   None, None),
    ("dream-128step",   DREAM, "text",      C4,                          224, 128,  224,  0.0, None, 0.9,  0.01,  2,   "gpt2-large",   None, None),
    # More model families (docs/models.md has each setting's source). LLaDA 1.5: its own lengths and blocks
    # (ML-GSAI/LLaDA EVAL.md); LLaDA Base: 256/256/256 (same), plain prompts; the coders: their model cards'
    # temperature, top_p and lengths; LLaDA-MoE: the llada-* protocol. Thresholds: the LLaDA / Dream rows'.
    ("llada15-math",    LLADA15, "math",   "data/math_test.json",       1024, 1024, 128, 0.0, None, 0.6,  0.01,  2,   None,           None, None),
    ("llada15-gsm8k",   LLADA15, "gsm8k",  GSM8K,                       256, 256,  16,   0.0, None, 0.6,  0.015, 2,   None,           None, None),
    ("llada15-humaneval", LLADA15, "humaneval", "human-eval",           512, 512,  32,   0.0, None, 0.9,  0.01,  2,   None,           None, None),
    ("llada15-mbpp",    LLADA15, "mbpp",   MBPP,                        512, 512,  32,   0.0, None, 0.7,  0.01,  2,   None,           None, None),
    ("llada-base-math", LLADA_BASE, "math", "data/math_test.json",      256, 256,  256,  0.0, None, 0.6,  0.01,  2,   None,           None, None),
    ("llada-base-gsm8k", LLADA_BASE, "gsm8k", GSM8K,                    256, 256,  256,  0.0, None, 0.6,  0.015, 2,   None,           None, None),
    ("dreamcoder-humaneval", DREAM_CODER, "humaneval", "human-eval",    512, 512,  512,  0.1, 0.95, 0.8,  0.001, 2,   None,           None, None),
    ("dreamcoder-mbpp", DREAM_CODER, "mbpp", MBPP,                      512, 512,  512,  0.1, 0.95, 0.9,  0.001, 2,   None,           None, None),
    ("diffucoder-humaneval", DIFFUCODER, "humaneval", "human-eval",     256, 256,  256,  0.4, 0.95, 0.8,  0.001, 2,   None,           None, None),
    ("diffucoder-mbpp", DIFFUCODER, "mbpp", MBPP,                       256, 256,  256,  0.4, 0.95, 0.9,  0.001, 2,   None,           None, None),
    ("llada-moe-math",  LLADA_MOE, "math", "data/math_test.json",       256, 256,  64,   0.0, None, 0.6,  0.01,  2,   None,           None, None),
    ("llada-moe-humaneval", LLADA_MOE, "humaneval", "human-eval",       256, 256,  64,   0.0, None, 0.9,  0.01,  2,   None,           None, None),
    ("llada-moe-gsm8k", LLADA_MOE, "gsm8k", GSM8K,                      256, 256,  64,   0.0, None, 0.6,  0.015, 2,   None,           None, None),
    ("tiny-math",       TINY,  "math",      "data/tiny_math_test.jsonl", 64,  64,   32,   0.0, None, 0.9,  0.01,  2,   None,           16,   100),
    ("tiny-code",       TINY,  "humaneval", "data/tiny_code_test.jsonl", 64,  64,   32,   0.0, None, 0.9,  0.01,  2,   None,           16,   100),
    ("tiny-text",       TINY,  "text",      TINY_TEXT,                   48,  48,   24,   0.0, None, 0.9,  0.01,  2,   "smollm2-135m", 16,   64),
]}

# Block-diffusion labels (docs/models.md): each model's published block size (= the model's), steps per
# block and temperature, at the llada-* rows' 256 tokens (the published 2,000-4,096: --gen_length); its own
# decoder is --decoder sdar / fastdllm_v2 / llada2.
SDAR, TRADO = "JetAstra/SDAR-4B-Chat", "Gen-Verse/TraDo-4B-Instruct"
FAST_DLLM_V2, LLADA2_MINI = "Efficient-Large-Model/Fast_dLLM_v2_7B", "inclusionAI/LLaDA2.0-mini"
BLOCK_MODELS = [  # prefix       model         gen  block steps/block temp top_p
    ("sdar",         SDAR,         256, 4,    4,          0.0, None),   # SDAR eval_sdar_hf.py: greedy (top_k 1)
    ("trado",        TRADO,        256, 4,    4,          1.0, 1.0),    # dLLM-RL configs/trado_eval.yaml
    ("fast-dllm-v2", FAST_DLLM_V2, 256, 32,   32,         0.0, None),   # Fast-dLLM v2 eval.py / eval_script.sh
    ("llada2-mini",  LLADA2_MINI,  256, 32,   32,         0.0, None),   # LLaDA2.0 generate() defaults
]
BLOCK_TASKS = [("math", "data/math_test.json", 0.6, 0.01), ("gsm8k", GSM8K, 0.6, 0.015),
               ("humaneval", "human-eval", 0.9, 0.01)]  # task, data, KLASS thresholds of the llada-* rows
LABELS.update({f"{prefix}-{task}": RunSettings(
    label=f"{prefix}-{task}", model=model, task=task, data=data, gen_length=gen, steps=gen // block * per_block,
    block_length=block, temperature=temp, top_p=top_p, conf_threshold=conf, kl_threshold=kl, history_length=2)
    for prefix, model, gen, block, per_block, temp, top_p in BLOCK_MODELS for task, data, conf, kl in BLOCK_TASKS})
networks.BLOCK_CHECKPOINTS.update({model: True for _, model, *_ in BLOCK_MODELS})

# ParallelBench labels (docs/parallelbench.md): <model>-pb-<task> for each task, <model>-pb for the
# waiting-line suite (a final line per task and their mean). ParallelBench's answer lengths (32 tokens
# for the waiting line, 64 for puzzles), one window, one token per step, greedy.
TINY_PB = os.path.join(REPO, "models", "tiny-pb")
PB_MODELS = [  # prefix model    batch limit
    ("llada",      LLADA,   None, None),
    ("dream",      DREAM,   None, None),
    ("tiny",       TINY_PB, 16,   None),
]


def pb_label(prefix, model, batch, limit, task=None):
    name, data = (f"{prefix}-pb-{task}", f"data/pb/{task}_test.jsonl") if task else (f"{prefix}-pb", "data/pb")
    n = parallelbench.answer_length(task)
    return RunSettings(label=name, model=model, task="pb", data=data, gen_length=n, steps=n, block_length=n,
                       temperature=0.0, top_p=None, conf_threshold=0.9, kl_threshold=0.01, history_length=2,
                       scorer=None, batch_size=batch, limit=limit)


LABELS.update({run.label: run for prefix, model, batch, limit in PB_MODELS
               for run in [pb_label(prefix, model, batch, limit)] + [pb_label(prefix, model, batch, limit, t)
                                                                     for t in parallelbench.TASKS]})

# ---------------------------------------------------------------------------
# Evaluation loop, result files and processes

DEVIATIONS = [
    "Generated tokens are cut at the first stop id (LLaDA 126081/126348, Dream 151643/151645) and decoded with "
    "special tokens skipped; KLASS cuts Dream text at the '<|endoftext|>' string only.",
    "HumanEval: the first fenced block is taken whatever its language tag; a body-only completion is re-indented "
    "instead of losing its first line's indentation to strip(); all 164 problems.",
    "avg_steps counts model forwards per sample where the model is called; KLASS's Dream code hard-codes 256.",
    "Top-k ties go to the lower position and k is clamped to the number of masked positions in the block.",
    "Sampling is seeded per batch (seed + index of the batch's first sample, recorded per sample); KLASS sets none.",
    "LLaDA KLASS at temperature > 0 takes confidence and KL from the clean logits (KLASS uses noisy values).",
    "MBPP: the 500-task test split of the full MBPP (task_ids 11-510, task text from 'text') instead of the Hugging "
    "Face sanitized test split (257 tasks) KLASS loads; judged by the HumanEval checker (HumanEval's fence rule, "
    "sandboxed process, 3 s, test_setup_code before the asserts) instead of KLASS's exec/eval of the first "
    "```python block.",
    "factor commits no failing rank; Fast-dLLM's get_transfer_index_dynamic (NVlabs/Fast-dLLM llada/generate.py) also "
    "commits the first failing rank when it is the last one (its top_i == len(threshs) - 1 increment).",
    "Dream-style proposals drop the mask id and the padded logit columns before the softmax, so their confidence "
    "(Dream KLASS fallback, dream_schedule scores) is renormalised over committable ids; KLASS's sample_tokens "
    "keeps them.",
]



def git_state():
    """(commit, dirty) of the repository, or (None, None) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout
    except OSError:
        return None, None
    return (commit, bool(status.strip())) if commit else (None, None)


def environment(dtype):
    import transformers
    commit, dirty = git_state()
    gpu = torch.cuda.is_available()
    return dict(git_commit=commit, git_dirty=dirty, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name() if gpu else None, dtype=str(dtype), threads=torch.get_num_threads(),
                gpu_peak_memory_gb=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if gpu else None,
                host=platform.node())


def progress(task, records, total):
    steps = f"avg_steps={np.mean([r['steps'] for r in records]):.1f}"
    value = f"{task.metric}={task.metrics(records)[task.final]:.3f}"
    fields = [steps, value] if task.name == "text" else [value, steps]
    return f"TRAIN_METRICS: {task.name} {len(records)}/{total} " + " ".join(fields)




def run_eval(run, lm, decoder, task, samples, run_dir, rank=0, world=1, rejudge=False):
    """Decode and judge this process's share of the samples not yet in the run directory.
    Returns the records of this process (those of earlier attempts included: checked and re-judged,
    demask/verdicts.py; a disagreement is an InputError, or with --rejudge corrected in the file)."""
    from tqdm import tqdm
    mine = {s["id"] for s in samples[rank::world]}
    path = os.path.join(run_dir, "samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl")
    wanted = {s["id"] for s in samples}
    if rejudge and world > 1:
        raise InputError("--rejudge rewrites the records of earlier attempts: run it in one process")
    records = read_checked(run_dir, run, task, samples, only=mine, rejudge=rejudge)
    if os.path.exists(path):
        rewrite(path, parse_samples_file(path, wanted))  # drops a line cut off by a crash before appending
    done = {r["id"] for r in records}
    index = {s["id"]: i for i, s in enumerate(samples)}
    todo = sorted((s for s in samples[rank::world] if s["id"] not in done), key=lambda s: len(s["prompt_ids"]))
    batches = [todo[i:i + run.batch_size] for i in range(0, len(todo), run.batch_size)]
    warned, total = False, len(mine)
    with open(path, "a") as out, tqdm(total=total, initial=len(records), file=sys.stderr, desc=run.label,
                                      disable=rank > 0) as bar:
        for batch in batches:
            # decode under the rule checks and the recorder, then judge
            seed = run.seed + index[batch[0]["id"]]
            start = time.time()
            traces = []
            generations, counted, reported = decode_batch(run, lm, decoder, batch, seed, traces)
            decoded = time.time()
            texts, stopped, verdicts = judge_batch(lm, task, batch, generations)
            decode_s, judge_s = (decoded - start) / len(batch), (time.time() - decoded) / len(batch)
            mismatch = steps_mismatch(decoder, counted, reported)
            if any(mismatch) and not warned:
                warned = True
                print(mismatch_warning(decoder, counted, reported, batch, mismatch), file=sys.stderr)

            # write each record durably before it counts
            for s, text, stop, steps, said, differs, verdict, traced in zip(batch, texts, stopped, counted, reported,
                                                                            mismatch, verdicts, traces):
                record = dict(id=s["id"], prompt=s.get("prefix") or s["messages"][-1]["content"], generation=text,
                              stopped=stop, **verdict, steps=steps, reported_steps=said, steps_mismatch=differs,
                              seed=seed, seconds=round(decode_s + judge_s, 4), decode_seconds=round(decode_s, 4),
                              judge_seconds=round(judge_s, 4), trace=traced)
                out.write(json_line(record))
                out.flush()
                os.fsync(out.fileno())
                records.append(record)
                bar.update(1)
                if rank == 0 and (len(records) % 10 == 0 or len(records) == total):
                    print(progress(task, records, total), flush=True)
    return records


def steps_mismatch(decoder, counted, reported):
    """Per sample, whether the decoder's used_steps differs from the counted forwards, like with
    like: a batched decoder reports one number for its batch, compared with the batch's largest
    count; a batch-1 decoder reports per sample."""
    if getattr(decoder, "batched", False):
        return [reported[0] != max(counted)] * len(counted)
    return [said != steps for said, steps in zip(reported, counted)]


def mismatch_warning(decoder, counted, reported, batch, mismatch):
    i = mismatch.index(True)
    if getattr(decoder, "batched", False):
        found = f"{max(counted)} forwards were counted for its longest sample (batch of sample {batch[0]['id']})"
    else:
        found = f"{counted[i]} forwards were counted (sample {batch[i]['id']})"
    return f"warning: decoder reported {reported[i]} steps but {found}; avg_steps uses the counted forwards"


def summarize(run, task, records, run_dir, lm, started):
    metrics, details = task.final_metrics(records, run, lm.device)
    metrics["avg_steps"] = float(np.mean([r["steps"] for r in records]))
    metrics["n_samples"] = float(len(records))
    traces = [r["trace"] for r in records if "trace" in r]
    improbable = trajectories.improbable_commits(traces)
    if improbable is not None and improbable > IMPROBABLE_WARNING:
        print(f"warning: {100 * improbable:.1f}% of the committed tokens had probability < "
              f"{trajectories.IMPROBABLE:g} under the logits before their commit, or none was returned "
              "(summary.json improbable_commits; see docs/decoders.md)", file=sys.stderr)
    summary = dict(label=run.label, decoder=run.decoder, fingerprint=run.fingerprint, code=decoder_code(run),
                   config=run.to_json(),
                   metrics=metrics, avg_reported_steps=float(np.mean([r["reported_steps"] for r in records])),
                   n_steps_mismatch=sum(r.get("steps_mismatch", r["reported_steps"] != r["steps"]) for r in records),
                   improbable_commits=improbable, sandbox=run.sandbox, cost=cost_summary(run, records),
                   order=trajectories.order_summary(traces), details=details,
                   environment=environment(lm.dtype), deviations_from_klass=DEVIATIONS + kvcache.deviations(run) + blockcache.deviations(lm),
                   wall_seconds=round(time.time() - started, 2))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


IMPROBABLE_WARNING = 0.05  # the share of improbable commits above which a run warns


def cost_summary(run, records):
    """What the run's samples cost: seconds per sample (decoding and judging), generated positions
    per decoding second and per counted forward, and the model's work: rows computed in full and
    in part (--cache) and the share of an exact run's positions computed."""
    n = len(records)
    decode = sum(r.get("decode_seconds", r.get("seconds", 0.0)) for r in records)
    judge = sum(r.get("judge_seconds", 0.0) for r in records)
    work = [sum(w) for w in zip(*(r["trace"]["computed"] for r in records if "computed" in r.get("trace", {})))]
    forwards = sum(r["steps"] for r in records)
    out = dict(decode_seconds_per_sample=round(decode / n, 4), judge_seconds_per_sample=round(judge / n, 4),
               tokens_per_second=round(n * run.gen_length / decode, 1) if decode > 0 else None,
               tokens_per_forward=round(n * run.gen_length / forwards, 3) if forwards else None)
    if work:
        out.update(full_forwards=work[0], partial_forwards=work[1],
                   positions_share=round(work[2] / work[3], 4) if work[3] else None)
    return out


def cost_line(cost):
    line = (f"cost: {cost['decode_seconds_per_sample']:.3f} s/sample decoding + {cost['judge_seconds_per_sample']:.3f} "
            f"judging, {cost['tokens_per_second']} tokens/s, {cost['tokens_per_forward']} tokens/forward")
    if "full_forwards" in cost:
        line += (f"; model rows computed: {cost['full_forwards']} full + {cost['partial_forwards']} partial, "
                 f"{100 * cost['positions_share']:.1f}% of an exact run's positions")
    return line


def distributed():
    """(rank, world size, device) under torchrun / accelerate launch; (0, 1, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, f"cuda:{local}" if torch.cuda.is_available() else "cpu"


def shared_run_dir(args, run, world):
    """The run directory (`<name>-<hash8>-<timestamp>`, name: the decoder class's `name`, else the
    registry name), named by rank 0 and shared with the others."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = args.resume or os.path.join(args.results_dir, run.label,
                                       f"{decoder_name(run)}{kvcache.tag(run)}-{run.fingerprint[:8]}-{stamp}")
    if world > 1:
        import torch.distributed as dist
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return name


def open_run_dir(run_dir, run, rank, world, message):
    """Rank 0 creates the run directory and writes config.json before the model is used."""
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(run.to_json(), f, indent=2)
        print(message, file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()


def evaluate(run, lm, task, samples, run_dir, started, rank=0, world=1, show=True, rejudge=False):
    """Evaluate one resolved configuration with a loaded model (main: once; a sweep: per
    configuration); `show` prints the final lines."""
    for s in samples:
        if "prompt_ids" not in s:
            s["prompt_ids"] = encode_prompt(lm, s)
    decoder = build_decoder(run.decoder, lm.mask_id, run, run.decoder_args)
    lm.renew_decoder_tokenizer()  # what an earlier configuration's decoder did to its copy stays there
    run_eval(run, lm, decoder, task, samples, run_dir, rank, world, rejudge)
    if world > 1:
        torch.distributed.barrier()
    metrics = None
    if rank == 0:
        records = merge_samples(run_dir, {s["id"] for s in samples})
        summary = summarize(run, task, records, run_dir, lm, started)
        metrics = summary["metrics"]
        if show:
            print(f"decoder: {decoder_name(run)} ({run.decoder}, fingerprint {run.fingerprint[:8]})", file=sys.stderr)
            print(cost_line(summary["cost"]), file=sys.stderr)
            for name, value in metrics.items():
                print(f"{name}_{run.label}: {value:.4f}")
    if world > 1:
        torch.distributed.barrier()
    return metrics

# ---------------------------------------------------------------------------
# Run identity: the decoder's code and arguments

PLUGIN_FILES = {}  # plugin module name -> file path


def decoder_source(cls):
    """The code a run's numbers come from: the editable region for DemaskDecoder, the whole file for
    a plugin's class, else the source of the class and of its bases."""
    if cls is DemaskDecoder:
        return EDITABLE_SOURCE
    if cls.__module__ in PLUGIN_FILES:
        return open(PLUGIN_FILES[cls.__module__]).read()
    try:
        return "\n".join(inspect.getsource(c) for c in cls.__mro__ if c is not object)
    except (OSError, TypeError):
        return f"{cls.__module__}.{cls.__qualname__}"


def decoder_fingerprint(run):
    """sha256 (16 hex) of the decoder's source, its registry entry, its resolved arguments and the
    --cache mode (for a cached run only): what the report groups runs by."""
    info = DECODERS[run.decoder]
    accepted = inspect.signature(info.cls.__init__).parameters
    arguments = {k: v for k, v in run.decoder_settings().items() if k in accepted}
    arguments.update(info.fixed, **run.decoder_args)
    text = decoder_source(info.cls) + json.dumps(arguments, sort_keys=True, default=str) + kvcache.tag(run)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decoder_code(run):
    """sha256 (16 hex) of the decoder's source alone: the version of its code, whatever its arguments
    (summary.json's `code`; the report's decoder families follow it, the fingerprint also covers the
    arguments and the --cache mode)."""
    return hashlib.sha256(decoder_source(DECODERS[run.decoder].cls).encode()).hexdigest()[:16]


def decoder_name(run):
    """How run directories and messages name the decoder: its class's `name`, else the registry name."""
    return (run.decoder_info or {}).get("name") or run.decoder


def harness_files():
    """The source files a run executes: this script, utils.py and every module of the package."""
    package = os.path.join(REPO, "demask")
    modules = sorted(os.path.join(package, name) for name in os.listdir(package) if name.endswith(".py"))
    return [os.path.abspath(__file__), os.path.join(REPO, "utils.py"), *modules]


def code_digest(paths):
    """sha256 of the files' names (relative to the repository; the entry script by its name) and texts."""
    digest = hashlib.sha256()
    for path in paths:
        name = os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else os.path.basename(path)
        digest.update(name.encode() + b"\0" + open(path, "rb").read() + b"\0")
    return digest.hexdigest()


def run_fingerprint(run):
    """sha256 (16 hex) of all the code that ran (harness_files and the plugin files) and the
    decoder's fingerprint: any edit of the code makes another run, which --resume refuses to mix."""
    text = code_digest(harness_files()) + code_digest(sorted(PLUGIN_FILES.values())) + run.decoder_fingerprint
    return hashlib.sha256(text.encode()).hexdigest()[:16]

# ---------------------------------------------------------------------------
# Sweeps: many configurations of one label with one model load, resumable

SWEEP_RUN_KEYS = {**{k: t for k, t in RUN_KEYS.items() if t is not str}, "seed": int}


def parse_value(text):
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sweep(text):
    """'threshold:alg_threshold=0.5,0.9;factor:alg_factor=1,2,block_length=32,64;klass' ->
    [(decoder, {key: value}), ...], the cartesian product of each method's listed values.
    A comma followed by `name=` starts the next key; a method without parameters runs once."""
    configs = []
    for part in filter(None, (t.strip() for t in text.split(";"))):
        name, _, rest = part.partition(":")
        grid = {}
        for chunk in filter(str.strip, re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", rest)):
            key, sep, values = chunk.partition("=")
            key = key.strip()
            if not sep or not key or not values.strip():
                raise ValueError(f"expected key=v1,v2,... after {name.strip()!r}, got {chunk.strip()!r}")
            if key in grid:
                raise ValueError(f"{key!r} is listed twice for {name.strip()!r}")
            grid[key] = [parse_value(v) for v in values.split(",")]
        if not name.strip():
            raise ValueError(f"no decoder name in {part!r}")
        for combo in itertools.product(*grid.values()):
            configs.append((name.strip(), dict(zip(grid, combo))))
    if not configs:
        raise ValueError("no configuration given")
    return configs


def sweep_run_name(run, overrides, without=()):
    """Deterministic run directory name: decoder, the swept values, and a hash of the whole
    configuration (decoder fingerprint and limit included; device, plugins and `without` excluded)."""
    stable = {k: v for k, v in run.to_json().items() if k not in ("device", "plugins", *without)}
    digest = hashlib.sha1(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = [decoder_name(run) + kvcache.tag(run)] + [f"{k}={v}" for k, v in overrides.items()] + [digest]
    return re.sub(r"[^\w.=+-]", "_", "-".join(parts))


def run_is_done(run_dir, run, n_samples):
    """A finished run of exactly this configuration (same fingerprint and settings)."""
    try:
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
        return summary["config"] == json.loads(json.dumps(run.to_json())) and summary["metrics"]["n_samples"] == n_samples
    except (OSError, ValueError, KeyError, TypeError):
        return False


def sweep_variant(base, decoder, overrides):
    """The settings of one configuration of a sweep: run settings among the overrides replace the
    label's, the others are decoder arguments."""
    changes = {}
    for key, value in overrides.items():
        if key in SWEEP_RUN_KEYS:
            try:
                changes[key] = SWEEP_RUN_KEYS[key](value)
            except (TypeError, ValueError):
                fail(f"--sweep: {key}={value!r} is not a valid {SWEEP_RUN_KEYS[key].__name__}")
            check_value(f"--sweep {key}", key, changes[key])
    decoder_args = {k: v for k, v in overrides.items() if k not in SWEEP_RUN_KEYS}
    return resolve(base.replace(decoder=decoder, decoder_args=decoder_args, **changes))


def sweep_plan(args):
    """(settings, run_dir) per configuration: the --sweep grid (or the one --decoder configuration)
    times the --seeds."""
    try:
        grid = parse_sweep(args.sweep) if args.sweep else [(args.decoder or "default", parse_decoder_args(args.decoder_args))]
    except ValueError as e:
        fail(f"--sweep: {e}")
    if args.seeds:
        grid = [(decoder, dict(overrides, seed=seed)) for decoder, overrides in grid for seed in args.seeds]
    base = label_settings(args)
    plan, seen = [], set()
    for decoder, overrides in grid:
        run = sweep_variant(base, decoder, overrides)
        run_dir = os.path.join(args.results_dir, run.label, sweep_run_name(run, overrides))
        if run_dir not in seen:
            seen.add(run_dir)
            plan.append((run, run_dir))
    return plan


def run_sweep(args):
    """Evaluate every configuration of --sweep and/or --seeds on one label with one model load. A
    configuration whose run directory has a complete summary.json is skipped; one with samples is
    resumed."""
    plan = sweep_plan(args)
    rank, world, device = distributed()
    task = TASKS[plan[0][0].task]()
    samples = task.load(plan[0][0])[:plan[0][0].limit]
    lm, results = None, []
    for i, (run, run_dir) in enumerate(plan):
        if run_is_done(run_dir, run, len(samples)):
            if rank == 0:
                print(f"sweep {i + 1}/{len(plan)}: {run_dir} is complete, skipped (its metrics re-derived from its "
                      "samples)", file=sys.stderr)
            # not trusted: its records checked and re-judged, its metrics recomputed instead of summary.json's
            results.append((run_dir, rederived_run_metrics(run_dir, run, task, samples, device or run.device,
                                                           rejudge=args.rejudge) if rank == 0 else None))
            continue
        if lm is None:
            preflight(run, rank)
            lm = load_model(run.model, device=device or run.device)
        open_run_dir(run_dir, run, rank, world, f"sweep {i + 1}/{len(plan)}: run directory {run_dir}")
        try:
            results.append((run_dir, evaluate(run, lm, task, samples, run_dir, time.time(), rank, world,
                                              show=not args.seeds, rejudge=args.rejudge)))
        finally:
            if rank == 0:
                remove_if_empty(run_dir)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        for run_dir, metrics in results:
            shown = " ".join(f"{k}={v:.4f}" for k, v in (metrics or {}).items())
            print(f"sweep: {os.path.basename(run_dir)} {shown}")
        if args.seeds:
            return [aggregate_seeds(args, group, show=not args.sweep) for group in seed_groups(plan, results)]
    return results


def seed_groups(plan, results):
    """The runs of each configuration over the seeds, in plan order."""
    groups = {}
    for (run, run_dir), (_, metrics) in zip(plan, results):
        key = json.dumps({k: v for k, v in run.to_json().items() if k != "seed"}, sort_keys=True, default=str)
        groups.setdefault(key, []).append((run, run_dir, metrics))
    return list(groups.values())


def aggregate_seeds(args, group, show):
    """seeds_summary.json (mean, sample std, min, max, n per metric) beside the seeds' run
    directories; `show` prints the final lines, `<metric>_<label>: mean ± std` then the plain mean
    (a sweep prints one `seeds:` line per configuration instead)."""
    run, label = group[0][0], group[0][0].label
    stats = {}
    for name in group[0][2]:
        values = np.array([metrics[name] for _, _, metrics in group])
        stats[name] = dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                           min=float(values.min()), max=float(values.max()), n=len(values))
    name = sweep_run_name(run, {}, without=("seed",)) + "-seeds"
    folder = os.path.join(args.results_dir, label, name)
    os.makedirs(folder, exist_ok=True)
    summary = dict(label=label, decoder=run.decoder, fingerprint=run.fingerprint, seeds=args.seeds,
                   runs=[os.path.relpath(run_dir, folder) for _, run_dir, _ in group], metrics=stats)
    with open(os.path.join(folder, "seeds_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"seeds: {folder}/seeds_summary.json", file=sys.stderr)
    if not show:
        print(f"seeds: {name} " + " ".join(f"{m}={s['mean']:.4f}±{s['std']:.4f}" for m, s in stats.items()))
        return stats
    for metric, s in stats.items():
        print(f"{metric}_{label}: {s['mean']:.4f} ± {s['std']:.4f}")
    for metric, s in stats.items():
        print(f"{metric}_{label}: {s['mean']:.4f}")
    return stats

# ---------------------------------------------------------------------------
# Command line

EXIT_CODES = {"usage": 2, "rule": 3, "input": 4, "output": 5, "interrupted": 130}
NUMERIC_FLAGS = [  # flag, type, lowest value, highest value, lowest excluded
    ("limit", int, 1, None, False), ("batch_size", int, 1, None, False), ("gen_length", int, 1, None, False),
    ("steps", int, 1, None, False), ("block_length", int, 1, None, False), ("temperature", float, 0.0, None, False),
    ("top_p", float, 0.0, 1.0, True), ("conf_threshold", float, 0.0, 1.0, False),
    ("kl_threshold", float, 0.0, None, False), ("history_length", int, 1, None, False),
    ("seed", int, 0, 2 ** 63 - 2 ** 32, False), ("threads", int, 1, None, False)]


FLAG_HELP = dict(limit="evaluate only the first N samples", seed="sampling seed (default 1234)",
                 batch_size="samples decoded together (default: the label's; else 8 on a GPU for batched "
                            "decoders, 1 otherwise)", threads="CPU threads (default: OMP_NUM_THREADS, else 1)")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_CODES["usage"])


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Evaluate a demasking strategy of a masked diffusion LM.",
        epilog="subcommands:\n  report RESULTS_DIR   leaderboard, Pareto plots, PBx and AUP from run directories "
               "(report --help)\n  decoders [NAME]      the registered decoders, their parameters, defaults and "
               "allowed values"
               "\n  compare RUN_A RUN_B  paired B − A statistics of two runs on the same samples (compare --help)",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", help=f"benchmark label: {', '.join(LABELS)}")
    p.add_argument("--model_path", help="local folder or hub id (default: the label's model)")
    p.add_argument("--decoder", help=f"decoder (default: default): {', '.join(DECODERS)}")
    p.add_argument("--decoder_args", help="extra decoder parameters: key=value,key=value")
    for name, kind, *_ in NUMERIC_FLAGS:
        p.add_argument(f"--{name}", type=kind, help=FLAG_HELP.get(name, "override the label's value"))
    p.add_argument("--scorer", help="text labels: scorer LM (gpt2-large, a local path, or smollm2-135m)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--cache", choices=kvcache.MODES, help="approximate KV cache, Fast-dLLM's (default: none, exact)")
    p.add_argument("--results_dir", default=os.path.join(REPO, "results"))
    p.add_argument("--resume", help="a run directory to continue (with no other run setting)")
    p.add_argument("--sweep", help="many configurations of the label, one model load, resumable: "
                   "'threshold:alg_threshold=0.7,0.9;factor:alg_factor=1,2,block_length=32,64;klass' "
                   "(cartesian product per decoder; keys are decoder parameters or run settings such as steps)")
    p.add_argument("--seeds", type=seed_list, help="one run per seed, then mean ± std: 42,43,44")
    p.add_argument("--plugin", action="append", default=[],
                   help="a Python file that registers decoders with register_method (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--rejudge", action="store_true", help="correct the stored verdicts of earlier records (--resume, "
                   "sweeps) that their task's judge disagrees with, instead of stopping (exit 4)")
    if not argv:
        p.print_usage(sys.stderr)
        print("error: give --label (labels: " + ", ".join(LABELS) + ") or --resume RUN_DIR", file=sys.stderr)
        sys.exit(EXIT_CODES["usage"])
    args = p.parse_args(argv)
    check_ranges(args)
    return args


def seed_list(text):
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError("a comma-separated list of distinct seeds >= 0")
    return seeds


def check_ranges(args):
    for name, *_ in NUMERIC_FLAGS:
        check_value(f"--{name}", name, getattr(args, name))


def check_value(flag, name, value):
    """A numeric run setting inside its NUMERIC_FLAGS bounds and finite, else a usage error."""
    bounds = {name: (low, high, open_low) for name, _, low, high, open_low in NUMERIC_FLAGS}
    if value is None or name not in bounds:
        return
    low, high, open_low = bounds[name]
    if not math.isfinite(value):
        fail(f"{flag} {value}: must be a finite number")
    if (value <= low if open_low else value < low) or (high is not None and value > high):
        fail(f"{flag} {value}: must be {'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else ""))


def parse_decoder_args(text):
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        if "=" not in item:
            fail(f"--decoder_args expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def check_model_path(path):
    looks_local = path.startswith(("/", ".", "~")) or os.path.exists(path.split("/")[0]) or path.count("/") != 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        fail(f"model path {path!r} not found (give a local folder or a hub id such as {LLADA})")


def check_device(device):
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        fail(f"--device {device!r}: not a device (cpu, cuda, cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: no CUDA device on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        fail(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        fail(f"--device {device}: only cpu and cuda are supported")


def default_batch_size(decoder, device):
    """8 on a GPU for decoders that declare `batched = True`, else 1."""
    gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return 8 if gpu and getattr(DECODERS[decoder].cls, "batched", False) else 1


def label_settings(args):
    """The label's settings with the command line's run settings, decoder and seed; not yet resolved
    (batch size, plugins, decoder info and fingerprint come from `resolve`)."""
    if args.label not in LABELS:
        fail(f"unknown label {args.label!r}; known labels: {', '.join(LABELS)}")
    if args.device:
        check_device(args.device)
    changes = {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None) is not None}
    if args.model_path:
        changes["model"] = args.model_path
    label = LABELS[args.label]
    return label.replace(**changes, label=args.label, decoder=args.decoder or "default", decoder_args=parse_decoder_args(args.decoder_args),
                         seed=1234 if args.seed is None else args.seed, device=args.device,
                         limit=args.limit or label.limit, batch_size=args.batch_size or label.batch_size,
                         cache=args.cache or "none")


def resolve(run):
    """The fully resolved settings of a run; every problem is reported before a model loads."""
    if run.decoder not in DECODERS:
        fail(f"unknown decoder {run.decoder!r}; known decoders: {', '.join(DECODERS)}")
    G, L, S = run.gen_length, run.block_length, run.steps
    if G % L:
        fail(f"gen_length {G} is not divisible by block_length {L}")
    if S % (G // L):
        fail(f"steps {S} is not divisible by the number of blocks {G // L}")
    check_model_path(run.model)
    if run.cache != "none" and networks.is_block_model(run.model):
        fail(f"--cache {run.cache}: {run.model} is a block-diffusion model, which keeps its own exact cache of finished "
             "blocks (docs/models.md); run it with --cache none")
    run = run.replace(batch_size=run.batch_size or default_batch_size(run.decoder, run.device),
                      plugins=tuple(sorted(PLUGIN_FILES.values())),
                      sandbox=sandbox.layer_description() if TASKS[run.task].runs_code else None)
    try:
        decoder = build_decoder(run.decoder, 0, run, run.decoder_args)
        run = run.replace(decoder_info=describe_decoder(run.decoder, decoder, run))
    except ValueError as e:
        fail(str(e))
    run = run.replace(decoder_fingerprint=decoder_fingerprint(run))
    return run.replace(fingerprint=run_fingerprint(run))


RESUME_FLAGS = ("label", "model_path", "decoder", "decoder_args", "scorer", "sweep", "plugin", "cache",
                *(name for name, *_ in NUMERIC_FLAGS if name != "threads"))


def resume_settings(args):
    """The stored settings of --resume, after checking that nothing asks for another run and that
    this code would run the same configuration."""
    path = os.path.join(args.resume, "config.json")
    if not os.path.exists(path):
        fail(f"--resume {args.resume!r}: no config.json there")
    given = [f"--{k}" for k in RESUME_FLAGS if getattr(args, k) not in (None, [], False)]
    if given:
        fail(f"--resume continues the stored configuration; drop {', '.join(given)}")
    try:
        stored = json.load(open(path))
        run = RunSettings.from_json(stored)
    except (ValueError, TypeError) as e:
        fail(f"--resume {args.resume!r}: config.json is not a run configuration ({e})")
    load_plugins(stored.get("plugins"))
    if args.device:
        check_device(args.device)
    now = resolve(run.replace(device=args.device, decoder_info=None, decoder_fingerprint=None, fingerprint=None,
                              sandbox=None)).to_json()
    differs = [k for k in sorted(set(now) | set(stored)) if k != "device" and now.get(k) != stored.get(k)]
    if differs:
        what = "; ".join(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in differs[:3])
        fail(f"--resume {args.resume!r}: the run's configuration differs from what this code would run ({what}); "
             "start a new run instead")
    return RunSettings.from_json(now)


def load_plugins(paths):
    """Run each Python file once; it registers decoders with `register_method` (importing
    custom_demask_eval, this module)."""
    for path in paths or []:
        path = os.path.abspath(os.path.expanduser(path))
        if path in PLUGIN_FILES.values():
            continue
        if not os.path.isfile(path):
            fail(f"--plugin {path!r}: no such file")
        name = "demask_plugin_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        PLUGIN_FILES[name] = path
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # a broken plugin is a usage error, reported before any model loads
            del PLUGIN_FILES[name]
            fail(f"--plugin {path!r} failed: {type(e).__name__}: {e}")


def set_threads(args, device):
    """CPU threads: --threads, else OMP_NUM_THREADS, else 1 for a run on the CPU (the CPU path is the
    bundled tiny model, fastest on one thread); a GPU run keeps torch's default."""
    on_cpu = not (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif on_cpu and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)


def report_main(argv):
    p = argparse.ArgumentParser(prog="custom_demask_eval.py report",
                                description="Leaderboard, Pareto plots, PBx and AUP from run directories.")
    p.add_argument("results_dir", help="folder searched recursively for summary.json files")
    p.add_argument("--out", help="report file (default: RESULTS_DIR/report.md; plots and report.csv beside it)")
    p.add_argument("--plugin", action="append", default=[], help="plugin files, for their registry entries")
    p.add_argument("--x", choices=("steps", "seconds"), default="steps",
                   help="the Pareto plots' x axis: avg_steps (default) or decoding seconds per sample")
    args = p.parse_args(argv)
    if not os.path.isdir(args.results_dir):
        fail(f"results folder {args.results_dir!r} not found")
    load_plugins(args.plugin)
    defaults = {name: run.to_json() for name, run in LABELS.items()}
    try:
        out, n = report.write_report(args.results_dir, args.out, defaults, list(RUN_KEYS), args.x)
    except ValueError as e:
        fail(str(e))
    print(f"report: {out} ({n} runs)", file=sys.stderr)
    return out


def decoders_main(argv):
    """`decoders [NAME]`: every registered decoder with its type and parameters, or one in full."""
    p = argparse.ArgumentParser(prog="custom_demask_eval.py decoders",
                                description="The registered decoders, their parameters, defaults and allowed values.")
    p.add_argument("name", nargs="?", help="one decoder, in full")
    p.add_argument("--plugin", action="append", default=[], help="plugin files that register decoders")
    args = p.parse_args(argv)
    load_plugins(args.plugin)
    if args.name and args.name not in DECODERS:
        fail(f"unknown decoder {args.name!r}; known decoders: {', '.join(DECODERS)}")
    for name in [args.name] if args.name else DECODERS:
        info = DECODERS[name]
        print(f"{name} ({info.method_type}): {info.summary or (info.cls.__doc__ or '').strip().splitlines()[0]}")
        if args.name:
            print(f"  class {info.cls.__module__}.{info.cls.__qualname__}; representative parameter "
                  f"{info.representative_param}; position score {info.position_score}; uses steps {info.uses_steps}")
            print(f"  reference: {info.reference or '-'}")
        for key, default, allowed, fixed in decoder_parameters(name):
            print(f"  {key:20s} {default!r:22} {allowed}{'  (fixed by this entry)' if fixed else ''}")


def compare_main(argv):
    """`compare RUN_A RUN_B`: paired differences B − A on the same samples (demask/compare.py,
    docs/compare.md). Exit 0, 2 (bad arguments; different tasks, data or sample sets), 4 (a run
    that cannot be read)."""
    from demask import compare
    p = argparse.ArgumentParser(prog="custom_demask_eval.py compare",
                                description="Paired statistics of two runs on the same samples (B − A): the metric's "
                                            "difference with a bootstrap interval over items, McNemar's exact p for "
                                            "0/1 verdicts, avg_steps' difference, the items that flip each way.")
    p.add_argument("run_a", help="run directory A")
    p.add_argument("run_b", help="run directory B (differences are B − A)")
    p.add_argument("--bootstrap", type=int, default=compare.N_BOOT, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=compare.SEED, help="bootstrap seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = p.parse_args(argv)
    if args.bootstrap < 1 or args.seed < 0:
        fail("--bootstrap must be >= 1 and --seed >= 0")
    for run_dir in (args.run_a, args.run_b):
        if not os.path.isdir(run_dir):
            fail(f"run directory {run_dir!r} not found")
    try:
        result = compare.compare_runs(args.run_a, args.run_b, args.bootstrap, args.seed)
    except compare.Mismatch as e:
        fail(str(e))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CODES["input"])
    print(json.dumps(result.to_json(), indent=2) if args.json else compare.format_comparison(result))
    return result


def run_main(args):
    """One configuration: resolve it, load the samples, open the run directory, load the model, evaluate."""
    if args.sweep and (args.resume or args.decoder or args.decoder_args):
        fail("--sweep names the decoders and their parameters and resumes itself: drop "
             "--decoder, --decoder_args and --resume")
    if args.seeds and (args.resume or args.seed is not None):
        fail("--seeds names the seeds and resumes itself: drop --seed and --resume")
    if args.sweep or args.seeds:
        return run_sweep(args)
    run = resume_settings(args) if args.resume else resolve(label_settings(args))
    rank, world, device = distributed()
    preflight(run, rank)
    started = time.time()
    task = TASKS[run.task]()
    samples = task.load(run)[:run.limit]
    run_dir = shared_run_dir(args, run, world)
    open_run_dir(run_dir, run, rank, world, f"run directory: {run_dir}" + (f" ({world} processes)" if world > 1 else ""))
    try:
        lm = load_model(run.model, device=device or run.device)
        metrics = evaluate(run, lm, task, samples, run_dir, started, rank, world, rejudge=args.rejudge)
    finally:
        if not args.resume and rank == 0:
            remove_if_empty(run_dir)
    if world > 1:
        torch.distributed.destroy_process_group()
    return metrics


def remove_if_empty(run_dir):
    """A run directory without a single sample after a failed start is removed, and its label's
    folder with it when nothing else is there."""
    if not os.path.isdir(run_dir):
        return
    paths = [os.path.join(run_dir, name) for name in os.listdir(run_dir)]
    if all(p.endswith("config.json") or p.endswith(".jsonl") and os.path.getsize(p) == 0 for p in paths):
        for p in paths:
            os.remove(p)
        os.rmdir(run_dir)
        label_dir = os.path.dirname(run_dir)
        if not os.listdir(label_dir):
            os.rmdir(label_dir)


LARGE_FOR_CPU = 2e9  # bytes of weights above which a run on the CPU must be asked for with --device cpu


def preflight(run, rank=0):
    """Before any long work: the model is reachable, a real-size model does not fall back to the CPU
    silently, and a GPU run says which GPU, its free memory and the measured peak of this label."""
    check_reachable(run.model)
    on_gpu = (run.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    size = networks.weight_bytes(run.model)
    if not on_gpu and run.device is None and size and size > LARGE_FOR_CPU:
        fail(f"model {run.model!r} has {size / 1e9:.1f} GB of weights and there is no CUDA GPU here: on the CPU "
             "(fp32) it would take hours; pass --device cpu to run it anyway")
    if on_gpu and rank == 0:
        print(gpu_line(run, size), file=sys.stderr)


def gpu_line(run, size):
    device = torch.device(run.device or "cuda")
    free, total = torch.cuda.mem_get_info(device)
    peak = measured_peak(run)
    if peak:
        gb, decoder, gpu, path = peak
        other = "" if decoder == run.decoder else f"; none measured with {run.decoder}"
        expected = f"{run.label} at batch {run.batch_size} peaked at {gb:.1f} GB with {decoder} on {gpu} ({path}{other})"
    else:
        expected = f"no peak measured for {run.label} at batch {run.batch_size}" + (
            f"; its weights alone take {size / 2 ** 30:.1f} GiB" if size else "")
    return (f"gpu: {torch.cuda.get_device_name(device)}, {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB free; "
            f"{expected}")


# End-to-end runs with peak_gpu_gb (bench_e2e.py): klass keeps float64 distributions of the whole
# generation and peaks higher than the top-k decoders.
PEAK_BENCHMARKS = ("benchmarks/h200_e2e.json", "benchmarks/h200_cache.json", "benchmarks/h100_e2e_cost.json")


def measured_peak(run):
    """(peak GB, decoder, GPU, file) of this label, batch size and cache mode in the end-to-end
    benchmarks, measured with this run's decoder where there is such a row, else with another; or None."""
    cache = f"--cache {run.cache}" if run.cache != "none" else None
    found = []
    for path in PEAK_BENCHMARKS:
        try:
            data = json.load(open(os.path.join(REPO, path)))
        except (OSError, ValueError):
            continue
        env = data.get("env") or {}
        gpu = env.get("gpu") or env.get("device") or "the benchmark's GPU"
        for row in (r for rows in data.values() if isinstance(rows, list) for r in rows if isinstance(r, dict)):
            extra = row.get("extra", "")
            same_cache = cache in extra if cache else "--cache" not in extra
            if row.get("label") == run.label and row.get("batch_size") == run.batch_size and same_cache:
                found.append((row.get("peak_gpu_gb"), row.get("decoder"), gpu, path))
    return next((f for f in found if f[1] == run.decoder), found[0] if found else None)
    cache = f"--cache {run.cache}" if run.cache != "none" else None
    for rows in (v for v in data.values() if isinstance(v, list)):
        for row in rows:
            if not isinstance(row, dict) or row.get("label") != run.label or row.get("batch_size") != run.batch_size:
                continue
            if (cache in row.get("extra", "")) if cache else "--cache" not in row.get("extra", ""):
                gpu = (data.get("env") or {}).get("gpu") or "the benchmark's GPU"
                return row.get("peak_gpu_gb"), gpu, os.path.relpath(path, REPO)
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["decoders"]:
        return decoders_main(argv[1:])
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    args = parse_args(argv)
    load_plugins(args.plugin)
    set_threads(args, args.device)
    try:
        return run_main(args)
    except (RuleViolation, InputError, OSError, KeyboardInterrupt) as e:
        if args.debug:
            raise
        kind = ("rule" if isinstance(e, RuleViolation) else "input" if isinstance(e, InputError)
                else "interrupted" if isinstance(e, KeyboardInterrupt) else "output")
        messages = dict(interrupted="interrupted; finished samples are kept (continue with --resume RUN_DIR)",
                        output=f"cannot write results: {e}")
        print(f"error: {messages.get(kind, str(e))}", file=sys.stderr)
        sys.exit(EXIT_CODES[kind])
