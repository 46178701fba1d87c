"""Reference decoders and the method registry.

In data-flow order: token choice and position scores shared by all decoders, `BlockDecoder`
(the per-row window loop), the reference decoders, and the registry that makes a decoder
selectable as `--decoder NAME`. Every row of a batch works on its own earliest block that still
has masks, so a row's forward count does not depend on the other rows of its batch.
"""
import inspect
import math
import re
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .settings import DECODER_SETTINGS


class Range(NamedTuple):
    """The allowed values of a numeric decoder argument: >= low (> low when open_low), <= high."""
    low: float = None
    high: float = None
    open_low: bool = False

    def holds(self, value):
        return ((self.low is None or (value > self.low if self.open_low else value >= self.low))
                and (self.high is None or value <= self.high))

    def __str__(self):
        low = None if self.low is None else f"{'>' if self.open_low else '>='} {self.low:g}"
        high = None if self.high is None else f"<= {self.high:g}"
        return " and ".join(filter(None, (low, high))) or "any finite number"

# ---------------------------------------------------------------------------
# Token choice and position scores


def get_num_transfer_tokens(mask, steps):
    """LLaDA's uniform schedule: [B, steps] tokens per step, remainder on the earliest steps."""
    n = mask.sum(dim=1, keepdim=True)
    step = torch.arange(steps, device=mask.device)
    return (n // steps + (step < n % steps)).long()


def current_block(masked, block_length, done=-1):
    """[B] long: each row's current block, the earliest block of its generation that still has a
    mask (masked: [B, gen_length] bool); `done` (a number or [B]) for rows without one. The one
    definition the rule check, BlockDecoder and the KV cache share."""
    first = masked.float().argmax(1).long() // block_length
    return torch.where(masked.any(1), first, done)


def add_gumbel_noise(logits, temperature):
    """LLaDA's Gumbel-max token choice: argmax of the result samples softmax(logits / T)."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = (-torch.log(torch.rand_like(logits))) ** temperature
    return logits.exp() / noise


def choosable(logits, model):
    """Logits for token choice only: the mask id and the padded logit columns beyond the
    tokenizer (the real checkpoints' logit width exceeds their vocabulary) can never be
    committed. Scores keep the full width."""
    allowed = torch.arange(logits.shape[-1], device=logits.device) < getattr(model, "n_tokens", logits.shape[-1])
    allowed[model.mask_id] = False
    return logits.masked_fill(~allowed, -torch.inf)


def clean_confidence(p, tokens):
    """Probability of each proposed token under the clean float64 distribution."""
    return torch.gather(p, -1, tokens[..., None]).squeeze(-1)


def dream_proposal(logits, temperature, top_p):
    """Dream's sample_tokens (Dream-org/Dream generation_utils.py): softmax(logits / temperature),
    top-p over the whole sorted vocabulary, then a draw (temperature > 0) or the argmax. Returns
    (tokens, that adjusted float64 distribution), for rules that read the whole distribution."""
    scaled = logits.to(torch.float64) / temperature if temperature > 0 else logits.to(torch.float64)
    q = F.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_q, order = torch.sort(q, dim=-1, descending=True)
        drop = sorted_q.cumsum(-1) - sorted_q > top_p
        q = q.scatter(-1, order, sorted_q.masked_fill(drop, 0.0))
        q = q / q.sum(-1, keepdim=True)
    if temperature > 0:
        return torch.multinomial(q.flatten(0, -2), 1).view(q.shape[:-1]), q
    return torch.argmax(q, dim=-1), q


def propose_tokens(logits, temperature, top_p, family, model=None):
    """Token choice. Returns (tokens, clean float64 probs, confidence). With `model`, ids that
    can never be committed are excluded from the choice (`choosable`).

    LLaDA style (ML-GSAI/LLaDA generate.py): Gumbel-max on the logits, confidence = clean
    probability of the token. Dream style (`dream_proposal`, with top-p through `top_p_tokens`):
    temperature, then top-p, then sample or argmax; confidence = probability of the drawn token
    under that adjusted distribution, which with `model` is renormalised over the committable ids.
    """
    p = F.softmax(logits.to(torch.float64), dim=-1)
    if model is not None:
        logits = choosable(logits, model)
    if family != "dream":
        tokens = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
        return tokens, p, clean_confidence(p, tokens)
    if top_p is not None and top_p < 1:
        scaled = logits.to(torch.float64) / temperature if temperature > 0 else logits.to(torch.float64)
        tokens, conf = top_p_tokens(scaled, top_p, temperature > 0)
        return tokens, p, conf
    tokens, q = dream_proposal(logits, temperature, top_p)
    return tokens, p, torch.gather(q, -1, tokens[..., None]).squeeze(-1)


TOP_P_CANDIDATES = (64, 2048)


def top_p_tokens(scaled, top_p, sample):
    """Dream's top-p (nucleus) choice without sorting the whole vocabulary: a token of rank r is kept
    when the mass of the r - 1 tokens above it is <= top_p, so once the best K tokens hold more than
    top_p no token below them is kept. Rows are tried with the best 64, then 2,048 candidates; rows
    whose candidates still hold less are sorted in full. Returns (tokens, their probability under
    the renormalised nucleus)."""
    rows = scaled.flatten(0, -2)
    log_norm = torch.logsumexp(rows, dim=-1, keepdim=True)
    tokens = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
    conf = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
    todo = torch.arange(rows.shape[0], device=rows.device)
    for k in (*TOP_P_CANDIDATES, rows.shape[-1]):
        if k >= rows.shape[-1]:
            top, index = rows[todo].sort(dim=-1, descending=True)
        else:
            top, index = rows[todo].topk(k, dim=-1)
        q = torch.exp(top - log_norm[todo])
        enough = (q.sum(-1) > top_p) | (k >= rows.shape[-1])
        done = todo[enough]
        tokens[done], conf[done] = nucleus_choice(q[enough], index[enough], top_p, sample)
        todo = todo[~enough]
        if not len(todo):
            break
    return tokens.view(scaled.shape[:-1]), conf.view(scaled.shape[:-1])


def nucleus_choice(q, index, top_p, sample):
    """q: probabilities in descending order with their token ids `index`; Dream's rule keeps a token
    while the mass before it is <= top_p, renormalises, then samples or takes the best."""
    kept = torch.where(q.cumsum(-1) - q > top_p, 0.0, q)
    kept = kept / kept.sum(-1, keepdim=True)
    pick = torch.multinomial(kept, 1) if sample else kept.argmax(-1, keepdim=True)
    return index.gather(-1, pick).squeeze(-1), kept.gather(-1, pick).squeeze(-1)


def top_k_commit(score, candidates, k):
    """The k best candidates per row by score; ties go to the lower position."""
    score = torch.where(candidates, score, -torch.inf)
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1)
    return candidates & (rank < k[:, None])


def top2_margin(p, tokens, conf):
    top2 = p.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def column_order(p, tokens, conf):
    return -torch.arange(conf.shape[1], dtype=torch.float64, device=conf.device).expand(conf.shape)


# Position scores rank masked positions (higher = commit first): f(p, tokens, conf) -> [B, Q] float64.
# p: clean float64 probabilities [B, Q, V]; tokens: proposed tokens; conf: the proposal's confidence
# (clean probability for LLaDA, Dream's adjusted one for Dream). Query positions are in increasing
# position order, so "position" can use the column index.
POSITION_SCORES = {
    "confidence": lambda p, tokens, conf: conf,
    "margin": top2_margin,
    "neg_entropy": lambda p, tokens, conf: torch.special.xlogy(p, p).sum(-1),
    "random": lambda p, tokens, conf: torch.rand(conf.shape, dtype=torch.float64, device=conf.device),
    "position": column_order,
}


def register_position_score(name, fn):
    """Add a position score usable as `score=NAME` by every decoder with a `score` parameter."""
    POSITION_SCORES[name] = fn


def check_position_score(name):
    if name not in POSITION_SCORES:
        raise ValueError(f"unknown score {name!r}; known scores: {', '.join(POSITION_SCORES)}")
    return name


def gumbel(shape, device):
    u = torch.rand(shape, dtype=torch.float64, device=device).clamp(min=1e-300)
    return -torch.log(-torch.log(u))


# ---------------------------------------------------------------------------
# The per-row window loop


class BlockDecoder:
    """Loop shared by the reference decoders; a subclass implements `select`.

    `select(logits, candidates, k, step, batch)` gets the logits of the query positions
    ([B, Q, V]; the current block, or the whole generation when `whole_generation`), the masked
    positions of each row's current block, the uniform schedule's k for this step, the step
    index within the block and the batch's state (`model`, `family`, `gen_length`, `steps`,
    `block_length`, `steps_per_block`, `masked`: the query positions still masked, plus what
    `start(batch)` adds); it returns
    (commit [B, Q] bool, tokens [B, Q]).
    """
    batched = True
    remasks = False
    whole_generation = False
    ranges = {"temperature": Range(0), "top_p": Range(0, 1, open_low=True)}

    def __init__(self, mask_id, temperature=0.0, top_p=None):
        self.mask_id, self.temperature, self.top_p = mask_id, temperature, top_p

    def start(self, batch):
        """Per-batch state of a decoder, set as attributes of `batch`."""

    def info(self, gen_length, steps, block_length):
        """Settings derived from the run (recorded in the run's config as decoder_info)."""
        return {}

    def propose(self, logits, batch):
        return propose_tokens(logits, self.temperature, self.top_p, batch.family, batch.model)

    @torch.no_grad()
    def decode(self, model, input_ids, gen_length, steps, block_length):
        B, P = input_ids.shape
        device = model.device
        x = F.pad(input_ids.to(device), (0, gen_length), value=self.mask_id)
        batch = SimpleNamespace(model=model, family=getattr(model, "family", "llada"), size=B, device=device,
                                gen_length=gen_length, steps=steps, block_length=block_length,
                                steps_per_block=steps // (gen_length // block_length))
        offsets = torch.arange(gen_length if self.whole_generation else block_length, device=device)
        block_of = torch.arange(gen_length, device=device) // block_length
        current = torch.full((B,), -1, device=device)
        step = torch.zeros(B, dtype=torch.long, device=device)
        schedule = torch.zeros(B, batch.steps_per_block, dtype=torch.long, device=device)
        self.start(batch)
        used_steps = 0
        while True:
            # each row's earliest block with masks; a row entering a block gets its schedule
            masked = x[:, P:] == self.mask_id
            if not masked.any():
                return x, used_steps
            block = current_block(masked, block_length, done=current)
            entered = block != current
            start = block * block_length
            query = offsets[None].expand(B, -1) if self.whole_generation else start[:, None] + offsets
            in_block = (query >= start[:, None]) & (query < start[:, None] + block_length)
            candidates = masked.gather(1, query) & in_block
            if entered.any():
                block_masks = (masked & (block_of[None] == block[:, None]))[entered]
                schedule[entered] = get_num_transfer_tokens(block_masks, batch.steps_per_block)
                step[entered] = 0
            current = block
            k = schedule.gather(1, step.clamp(max=batch.steps_per_block - 1)[:, None]).squeeze(1)
            k = torch.minimum(k.clamp(min=1), candidates.sum(1))

            # one forward, then the subclass's commit rule
            batch.masked = masked.gather(1, query)
            logits = model(x, query_idx=P + query).logits
            commit, tokens = self.select(logits, candidates, k, step, batch)
            gen = x[:, P:]
            gen.scatter_(1, query, torch.where(commit, tokens, gen.gather(1, query)))
            step += 1
            used_steps += 1


# ---------------------------------------------------------------------------
# Reference decoders


class TopKDecoder(BlockDecoder):
    """Top-k family (LLaDA generate.py low_confidence / random remasking; ParallelBench): commit
    the k best masked positions by a position score.

    score: a name in POSITION_SCORES. alg_temp > 0 draws the k positions from
    softmax(score / alg_temp) without replacement (Gumbel-top-k) instead of taking the k best.
    """

    ranges = {**BlockDecoder.ranges, "alg_temp": Range(0)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, score="confidence", alg_temp=0.0):
        super().__init__(mask_id, temperature, top_p)
        self.score, self.alg_temp = check_position_score(score), float(alg_temp)

    def rank(self, p, tokens, conf):
        score = POSITION_SCORES[self.score](p, tokens, conf).to(torch.float64)
        if self.alg_temp > 0:
            score = score / self.alg_temp + gumbel(score.shape, score.device)
        return score

    def select(self, logits, candidates, k, step, batch):
        tokens, p, conf = self.propose(logits, batch)
        return top_k_commit(self.rank(p, tokens, conf), candidates, k), tokens


class KlassDecoder(BlockDecoder):
    """KLASS (Kim et al., arXiv 2511.05664; shkim0116/KLASS) with both published variants.

    variant "llada": in-block step guard, ready = conf > threshold, fallback = schedule top-k.
    variant "dream": no guard, ready = conf >= threshold, committed token is the greedy argmax,
    fallback commits one position: the best by the confidence of a temperature/top-p draw.
    "auto" picks the variant of the model family.
    """
    whole_generation = True

    ranges = {**BlockDecoder.ranges, "conf_threshold": Range(0, 1), "kl_threshold": Range(0),
              "history_length": Range(1)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, conf_threshold=0.9, kl_threshold=0.01,
                 history_length=2, unmask_strategy="all", variant="auto"):
        super().__init__(mask_id, temperature, top_p)
        if unmask_strategy not in ("all", "max_conf", "min_kl") or variant not in ("auto", "llada", "dream"):
            raise ValueError("klass: unmask_strategy is all, max_conf or min_kl; variant is auto, llada or dream")
        self.conf_threshold, self.kl_threshold = conf_threshold, kl_threshold
        self.history_length, self.unmask_strategy, self.variant = history_length, unmask_strategy, variant

    def start(self, batch):
        batch.p_prev = torch.zeros((), dtype=torch.float64, device=batch.device)
        batch.history = torch.zeros(batch.size, batch.gen_length, self.history_length, dtype=torch.float64,
                                    device=batch.device)

    def select(self, logits, candidates, k, step, batch):
        dream = (self.variant if self.variant != "auto" else batch.family) == "dream"
        drawn, p, drawn_conf = self.propose(logits, batch)
        tokens = choosable(logits, batch.model).argmax(-1) if dream else drawn  # greedy among committable ids
        conf = clean_confidence(p, tokens)
        kl = (p * (torch.log(p + 1e-12) - torch.log(batch.p_prev + 1e-12))).sum(-1)
        batch.history = torch.cat([batch.history[..., 1:], kl[..., None]], dim=-1)
        batch.p_prev = p
        stable = (batch.history < self.kl_threshold).all(-1)
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
    """Fast-dLLM confidence threshold (Wu et al., arXiv 2505.22618): commit every masked position
    of the window whose clean confidence is >= alg_threshold, and always the most confident one.
    The window loops until it has no mask; `steps` is not used."""

    ranges = {**BlockDecoder.ranges, "alg_threshold": Range(0, 1)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, alg_threshold=0.9):
        super().__init__(mask_id, temperature, top_p)
        self.alg_threshold = float(alg_threshold)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, _ = self.propose(logits, batch)
        conf = clean_confidence(p, tokens)
        best = top_k_commit(conf, candidates, torch.ones_like(k))
        return best | (candidates & (conf >= self.alg_threshold)), tokens


class FactorDecoder(BlockDecoder):
    """Fast-dLLM factor rule (Wu et al., arXiv 2505.22618): with the window's clean confidences
    sorted, c(1) >= c(2) >= ..., accept ranks r = 1, 2, ... while c(r) >= 1 - alg_factor / (r + 1),
    rank 1 always; stop at the first failing rank (which is never committed, also when it is the last)."""

    ranges = {**BlockDecoder.ranges, "alg_factor": Range(0, open_low=True)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, alg_factor=1.0):
        super().__init__(mask_id, temperature, top_p)
        self.alg_factor = float(alg_factor)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, _ = self.propose(logits, batch)
        conf = clean_confidence(p, tokens)
        ranked = torch.where(candidates, conf, -torch.inf).sort(dim=1, descending=True, stable=True).values
        r = torch.arange(1, ranked.shape[1] + 1, device=ranked.device, dtype=torch.float64)
        ok = ranked >= 1 - self.alg_factor / (r + 1)
        ok[:, 0] = True
        n = torch.minimum(ok.long().cumprod(1).sum(1), candidates.sum(1))
        return top_k_commit(conf, candidates, n), tokens


def pyramidal_steps(length, factor=1, rule="project"):
    """Steps of a pyramidal window (ML-GSAI/LLaDA issue #93), k_i = i // factor + 1.

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
    """Pyramidal schedule (ML-GSAI/LLaDA issue #93): top-k by a score with k_i = i // factor + 1 at
    step i of a window, S steps per window derived from the window length (`steps` is not used),
    k clamped to the masks left, and the last of the S steps commits every remaining mask."""

    ranges = {**BlockDecoder.ranges, "factor": Range(1)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, factor=1, steps_rule="project", score="confidence"):
        super().__init__(mask_id, temperature, top_p)
        pyramidal_steps(1, factor, steps_rule)  # validates
        self.factor, self.steps_rule, self.score = int(factor), steps_rule, check_position_score(score)

    def info(self, gen_length, steps, block_length):
        d = pyramidal_steps(block_length, self.factor, self.steps_rule)
        return dict(window_length=block_length, **d, forwards=d["forwards_per_window"] * (gen_length // block_length))

    def start(self, batch):
        batch.window_steps = pyramidal_steps(batch.block_length, self.factor, self.steps_rule)["formula_steps"]

    def select(self, logits, candidates, k, step, batch):
        tokens, p, conf = self.propose(logits, batch)
        left = candidates.sum(1)
        want = torch.where(step >= batch.window_steps - 1, left, torch.div(step, self.factor, rounding_mode="floor") + 1)
        return top_k_commit(POSITION_SCORES[self.score](p, tokens, conf), candidates, torch.minimum(want, left)), tokens


class EBSamplerDecoder(BlockDecoder):
    """EB-Sampler (Ben-Hamu et al., arXiv 2505.24857): order the window's masked positions by an
    error proxy, ascending (entropy, or -confidence with proxy="confidence"), and commit the longest
    prefix U with sum_U H - max_U H <= gamma (at least one position). Entropies in nats unless
    gamma_unit="bits". The window loops until it has no mask; `steps` is not used."""

    ranges = {**BlockDecoder.ranges, "gamma": Range(0)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, gamma=0.1, gamma_unit="nats", proxy="entropy"):
        super().__init__(mask_id, temperature, top_p)
        if gamma_unit not in ("nats", "bits") or proxy not in ("entropy", "confidence"):
            raise ValueError("eb_sampler: gamma_unit is nats or bits, proxy is entropy or confidence")
        self.gamma, self.gamma_unit, self.proxy = float(gamma), gamma_unit, proxy

    def info(self, gen_length, steps, block_length):
        return dict(gamma=self.gamma, gamma_unit=self.gamma_unit, proxy=self.proxy)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, _ = self.propose(logits, batch)
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
    """DUS's dilated position levels of a window (omerlux/DUS, scheduler "dilated"), as offsets."""
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
    """Dilated unmasking (omerlux/DUS, scheduler "dilated"): step t of a window commits exactly the
    positions of level t (a fixed, confidence-free schedule); one forward per level, e.g. 5 per
    window of 32 with base 2. `steps` is not used. Positions of a level that are no longer masked
    are skipped; a step left with nothing commits the most confident position."""

    ranges = {**BlockDecoder.ranges, "base": Range(2)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, base=2):
        super().__init__(mask_id, temperature, top_p)
        dilated_levels(1, base)  # validates
        self.base = int(base)

    def info(self, gen_length, steps, block_length):
        sizes = [len(level) for level in dilated_levels(block_length, self.base)]
        return dict(level_sizes=sizes, forwards_per_window=len(sizes), forwards=len(sizes) * (gen_length // block_length))

    def start(self, batch):
        level_of = torch.zeros(batch.block_length, dtype=torch.long)
        for i, level in enumerate(dilated_levels(batch.block_length, self.base)):
            level_of[level] = i
        batch.level_of = level_of.to(batch.device)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, conf = self.propose(logits, batch)
        due = candidates & (batch.level_of[None] <= step[:, None])
        spare = top_k_commit(conf, candidates, torch.ones_like(k))
        return torch.where(due.any(1, keepdim=True), due, spare), tokens


class ProphetDecoder(BlockDecoder):
    """Prophet early commit (Li et al., arXiv 2508.19982; pixeli99/Prophet), window-respecting
    variant (fill=window).

    Low-confidence top-k with the uniform schedule; before each step's transfer the mean top-1 minus
    top-2 raw-logit gap over the answer region is compared to a threshold that falls with progress =
    (forwards of this row so far) / steps: tau_early below 0.33, tau_mid below 0.67, tau_late after.
    Once gap >= threshold, every masked position of the current window is committed (greedy/proposed
    tokens) and decoding continues normally in the next window, where the test is made again.
    Answer region: answer_start=None (default) = the current window's masked positions; otherwise
    the answer_length generation positions from answer_start (0-based within the generation; with
    Prophet's evaluation constraints this is 204, 5), masked or not, wherever the current window is.
    """

    ranges = {**BlockDecoder.ranges, "tau_early": Range(0), "tau_mid": Range(0), "tau_late": Range(0),
              "answer_start": Range(0), "answer_length": Range(1)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, score="confidence", tau_early=7.5, tau_mid=5.0,
                 tau_late=2.5, answer_start=None, answer_length=5):
        super().__init__(mask_id, temperature, top_p)
        self.score, self.taus = check_position_score(score), (float(tau_early), float(tau_mid), float(tau_late))
        self.answer_start, self.answer_length = answer_start, int(answer_length)
        self.whole_generation = answer_start is not None

    def info(self, gen_length, steps, block_length):
        if self.answer_start is None:
            region = "current window's masked positions"
        else:
            region = f"generation positions {self.answer_start}..{self.answer_start + self.answer_length - 1}"
        return dict(fill="window", answer_region=region, thresholds=list(self.taus))

    def start(self, batch):
        batch.forwards = torch.zeros(batch.size, dtype=torch.long, device=batch.device)
        if self.answer_start is not None:
            if not 0 <= self.answer_start <= batch.gen_length - self.answer_length or self.answer_length < 1:
                raise ValueError(f"prophet answer region {self.answer_start}+{self.answer_length} is outside "
                                 f"the generation of {batch.gen_length}")
            batch.region = torch.zeros(batch.gen_length, dtype=torch.bool, device=batch.device)
            batch.region[self.answer_start:self.answer_start + self.answer_length] = True

    def select(self, logits, candidates, k, step, batch):
        tokens, p, conf = self.propose(logits, batch)
        active = candidates.any(1)
        batch.forwards += active.long()
        top2 = logits.to(torch.float64).topk(2, dim=-1).values
        gap = top2[..., 0] - top2[..., 1]
        region = candidates if self.answer_start is None else batch.region[None].expand_as(candidates)
        mean_gap = (gap * region).sum(1) / region.sum(1).clamp(min=1)
        progress = batch.forwards.to(torch.float64) / batch.steps
        tau = torch.where(progress < 0.33, self.taus[0], torch.where(progress < 0.67, self.taus[1], self.taus[2]))
        early = active & (mean_gap >= tau)
        normal = top_k_commit(POSITION_SCORES[self.score](p, tokens, conf), candidates, k)
        return torch.where(early[:, None], candidates, normal), tokens


class RemdmDecoder(BlockDecoder):
    """ReMDM-style remasking on top of top-k (Wang et al., arXiv 2503.00307; harness adaptation).

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

    ranges = {**BlockDecoder.ranges, "eta": Range(0, 1)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, score="confidence", sigma="cap", eta=0.02):
        super().__init__(mask_id, temperature, top_p)
        if sigma not in ("cap", "conf"):
            raise ValueError(f"remdm sigma is cap or conf, got {sigma!r}")
        self.score, self.sigma, self.eta = check_position_score(score), sigma, float(eta)

    def info(self, gen_length, steps, block_length):
        return dict(sigma=self.sigma, eta=self.eta if self.sigma == "cap" else None, remask_until="last scheduled step")

    def start(self, batch):
        batch.psi = torch.zeros(batch.size, batch.block_length, dtype=torch.float64, device=batch.device)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, conf = self.propose(logits, batch)
        commit = top_k_commit(POSITION_SCORES[self.score](p, tokens, conf), candidates, k)
        active = candidates.any(1, keepdim=True)
        decoded = active & ~candidates  # window tokens committed at earlier steps
        batch.psi[step == 0] = 0.0
        s, j = batch.steps_per_block, step.to(torch.float64)[:, None]
        ratio = torch.where(j > 0, (1 - (j + 1) / s).clamp(min=0) / j.clamp(min=1) * s, torch.inf)
        if self.sigma == "cap":
            sigma = ratio.clamp(max=self.eta).expand_as(batch.psi)
        else:
            weights = torch.softmax(torch.where(decoded, batch.psi, -torch.inf), dim=1).nan_to_num(0.0)
            sigma = ratio.clamp(max=1.0) * weights
        remask = decoded & (torch.rand(sigma.shape, dtype=torch.float64, device=sigma.device) < sigma)
        remask &= (step < s - 1)[:, None]
        batch.psi = torch.where(commit, -conf, batch.psi)
        return commit | remask, torch.where(remask, self.mask_id, tokens)


# ---------------------------------------------------------------------------
# Method registry (in the spirit of ParallelBench's MethodInfo)

METHOD_TYPES = ("topk", "threshold", "factor", "adaptive", "schedule", "remask", "custom")


class MethodInfo(NamedTuple):
    """A registered decoder."""
    cls: type
    fixed: dict
    method_type: str = "custom"
    representative_param: str = None  # "k" means gen_length / steps
    position_score: str = None
    uses_steps: bool = True  # False: the method derives its own number of steps
    summary: str = ""
    reference: str = ""


DECODERS = {}

# Optional class attributes by which a decoder class names and describes itself (all strings):
# `name` (how the report and the run directory name it, e.g. "cfad"; letters, digits, _ . -),
# `method_type` (one of METHOD_TYPES), `representative_param`, `position_score`, `summary`.
DESCRIBING = ("name", "method_type", "representative_param", "position_score", "summary")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")


def class_description(cls):
    """The DESCRIBING attributes a decoder class sets (non-empty strings only); raises ValueError for
    a method_type outside METHOD_TYPES or a name that is not a short word."""
    own = {k: v for k in DESCRIBING if isinstance(v := getattr(cls, k, None), str) and v}
    if own.get("method_type", "custom") not in METHOD_TYPES:
        raise ValueError(f"{cls.__name__}.method_type must be one of {METHOD_TYPES}, got {own['method_type']!r}")
    if "name" in own and not NAME_PATTERN.fullmatch(own["name"]):
        raise ValueError(f"{cls.__name__}.name must be up to 48 letters, digits, _ . or -, starting with a letter "
                         f"or digit; got {own['name']!r}")
    return own


def register_method(name, cls, method_type=None, representative_param=None, position_score=None,
                    uses_steps=None, summary=None, reference="", replace=False, **fixed):
    """Make `cls` selectable as `--decoder NAME` (and in sweeps and reports).

    cls: a class built as cls(mask_id=..., <settings its constructor accepts>) with a
    decode(model, input_ids, gen_length, steps, block_length) -> (x, steps) method; subclass
    BlockDecoder to get the per-row window loop. method_type: one of METHOD_TYPES.
    representative_param: the parameter a sweep of this method varies ("k" = gen_length / steps).
    position_score: what it ranks positions by (a POSITION_SCORES name or a description).
    uses_steps: whether `steps` matters (default: False for threshold, factor and schedule types).
    fixed: constructor arguments fixed by this entry (decoder_args can still override them).
    method_type, representative_param, position_score and summary not given here come from the
    class's attributes of those names (`class_description`), else "custom", None, None and "".
    """
    own = class_description(cls)
    method_type = method_type or own.get("method_type", "custom")
    representative_param = representative_param or own.get("representative_param")
    position_score = position_score or own.get("position_score")
    summary = own.get("summary", "") if summary is None else summary
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
    if old is not None and not replace and (old.cls, old.fixed) != (cls, fixed):
        raise ValueError(f"decoder {name!r} is already registered (pass replace=True to replace it)")
    if uses_steps is None:
        uses_steps = method_type not in ("threshold", "factor", "schedule")
    DECODERS[name] = MethodInfo(cls, dict(fixed), method_type, representative_param, position_score, uses_steps,
                                summary, reference)
    return DECODERS[name]


def method_config_keys(name):
    """Configuration keys that distinguish runs of a method: its constructor's parameters (less those
    the entry fixes; decoder_args can still override them), the generation and window lengths, and
    `steps` where the method uses it."""
    info = DECODERS[name]
    keys = set(inspect.signature(info.cls.__init__).parameters) - {"self", "mask_id"} - set(info.fixed)
    return sorted(keys | {"gen_length", "block_length"} | ({"steps"} if info.uses_steps else set()))


def method_position_score(name, decoder_args=None):
    """The position score a run of the method used (a `score` decoder argument wins)."""
    info = DECODERS[name]
    return (decoder_args or {}).get("score") or info.fixed.get("score") or info.position_score


def build_decoder(name, mask_id, settings, decoder_args):
    """Instantiate a registered decoder with its own named arguments: the run settings of
    DECODER_SETTINGS its constructor accepts (`settings`: a RunSettings or a dict), the entry's
    fixed arguments and `decoder_args`. The one place where decoder names and arguments are checked:
    raises ValueError (unknown name or parameter, or a value the constructor refuses)."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; known decoders: {', '.join(DECODERS)}")
    info = DECODERS[name]
    accepted = inspect.signature(info.cls.__init__).parameters
    unknown = set(decoder_args) - set(accepted)
    if unknown:
        valid = ", ".join(k for k in accepted if k not in ("self", "mask_id")) or "none"
        raise ValueError(f"decoder {name!r} has no parameter(s) {sorted(unknown)}; its parameters: {valid}")
    named = settings.decoder_settings() if hasattr(settings, "decoder_settings") else settings
    kwargs = {k: v for k, v in named.items() if k in DECODER_SETTINGS and k in accepted and v is not None}
    check_arguments(name, info.cls, {**kwargs, **info.fixed, **decoder_args})
    try:
        return info.cls(mask_id=mask_id, **{**kwargs, **info.fixed, **decoder_args})
    except TypeError as e:
        raise ValueError(f"decoder {name!r}: {e}") from e


def decoder_parameters(name):
    """[(parameter, default, allowed values, fixed by the entry)] of a registered decoder's
    constructor, mask_id left out; a parameter without a default shows "required"."""
    info = DECODERS[name]
    ranges = getattr(info.cls, "ranges", {})
    out = []
    for param in list(inspect.signature(info.cls.__init__).parameters.values())[1:]:
        if param.name == "mask_id" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = "required" if param.default is param.empty else param.default
        allowed = str(ranges[param.name]) if param.name in ranges else "any"
        out.append((param.name, info.fixed.get(param.name, default), allowed, param.name in info.fixed))
    return out


def check_arguments(name, cls, arguments):
    """Numbers must be finite and inside the class's declared `ranges` (ValueError naming the argument)."""
    ranges = getattr(cls, "ranges", {})
    for key, value in arguments.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise ValueError(f"decoder {name!r}: {key}={value} is not a finite number")
        if key in ranges and not ranges[key].holds(value):
            raise ValueError(f"decoder {name!r}: {key}={value} must be {ranges[key]}")


def describe_decoder(name, decoder, run):
    """What a run records about its decoder (config.json's decoder_info): method type,
    representative parameter and position score as the decoder's class gives them in its
    attributes (`class_description`), else as its registry entry does (a `score` decoder argument
    wins); the class's `name` and `summary` when it sets them, and when it sets its
    representative parameter, that parameter's value on the instance (`representative_value`);
    then the settings the decoder derives from the run (`info`)."""
    info = DECODERS[name]
    cls = type(decoder)
    own = class_description(cls)
    args = run.decoder_args or {}
    out = {"name": own["name"]} if "name" in own else {}
    out.update(method_type=own.get("method_type", info.method_type),
               representative_param=own.get("representative_param", info.representative_param),
               position_score=args.get("score") or own.get("position_score") or method_position_score(name, args),
               remasks=bool(getattr(decoder, "remasks", False)), batched=bool(getattr(decoder, "batched", False)),
               cls=f"{cls.__module__}.{cls.__qualname__}")
    if "summary" in own:
        out["summary"] = own["summary"]
    value = getattr(decoder, own.get("representative_param", ""), None)
    if isinstance(value, (bool, int, float, str)):
        out["representative_value"] = value
    if callable(getattr(decoder, "info", None)):
        out.update(decoder.info(run.gen_length, run.steps, run.block_length))
    return out


TOPK = dict(method_type="topk", representative_param="k", reference="LLaDA generate.py; ParallelBench")
register_method("confidence_greedy", TopKDecoder, position_score="confidence", score="confidence",
                summary="top-k by confidence of the proposed token (LLaDA low_confidence)", **TOPK)
register_method("topk_margin", TopKDecoder, position_score="margin", score="margin",
                summary="top-k by top-1 minus top-2 probability", **TOPK)
register_method("entropy_topk", TopKDecoder, position_score="neg_entropy", score="neg_entropy",
                summary="top-k by negative entropy sum p ln p (lowest entropy first)", **TOPK)
register_method("random", TopKDecoder, position_score="random", score="random",
                summary="k uniformly random masked positions (LLaDA random remasking)", **TOPK)
register_method("left_to_right", TopKDecoder, position_score="position", score="position",
                summary="the k leftmost masked positions", **TOPK)
register_method("klass", KlassDecoder, method_type="adaptive", representative_param="kl_threshold",
                position_score="confidence", summary="KL-stable and confident positions, else schedule top-k",
                reference="Kim et al. arXiv 2511.05664 (shkim0116/KLASS)")
register_method("klass_kl", KlassDecoder, method_type="adaptive", representative_param="kl_threshold",
                position_score="confidence", conf_threshold=0.0,
                summary="KLASS with readiness from KL only (conf_threshold 0)", reference="KLASS variant table")
register_method("threshold", ThresholdDecoder, method_type="threshold", representative_param="alg_threshold",
                position_score="confidence",
                summary="commit all positions with confidence >= alg_threshold (at least the best)",
                reference="Fast-dLLM, Wu et al. arXiv 2505.22618")
register_method("factor", FactorDecoder, method_type="factor", representative_param="alg_factor",
                position_score="confidence", summary="commit ranks r while c(r) >= 1 - alg_factor/(r+1)",
                reference="Fast-dLLM, Wu et al. arXiv 2505.22618")
register_method("pyramidal", PyramidalDecoder, method_type="schedule", representative_param="factor",
                position_score="confidence", summary="top-k with k_i = i // factor + 1 over S steps derived per window",
                reference="ML-GSAI/LLaDA issue #93")
register_method("eb_sampler", EBSamplerDecoder, method_type="adaptive", representative_param="gamma",
                uses_steps=False, position_score="neg_entropy",
                summary="longest low-entropy prefix with sum H - max H <= gamma (nats)",
                reference="Ben-Hamu et al. arXiv 2505.24857")
register_method("dus", DUSDecoder, method_type="schedule", representative_param="base",
                summary="fixed dilated position levels, one forward per level", reference="omerlux/DUS")
register_method("prophet", ProphetDecoder, method_type="adaptive", representative_param="tau_early",
                position_score="confidence",
                summary="top-k; commit the whole window once the answer logit gap passes a threshold",
                reference="Li et al. arXiv 2508.19982 (pixeli99/Prophet)")
register_method("remdm", RemdmDecoder, method_type="remask", representative_param="eta", position_score="confidence",
                summary="top-k plus re-masking of decoded window tokens (sigma cap or conf)",
                reference="Wang et al. arXiv 2503.00307 (kuleshov-group/remdm)")


# ---------------------------------------------------------------------------
# Dream's own schedule

DREAM_EPS = 1e-3  # Dream-v0-Instruct-7B generation_config.json


def dream_fractions(steps):
    """Dream's share of the masks left that step j unmasks, 1 - t[j+1] / t[j] with
    t = linspace(1, eps, steps + 1), in float32 as Dream computes it; the last step takes all (1)."""
    t = torch.linspace(1, DREAM_EPS, steps + 1)
    fraction = 1 - t[1:] / t[:-1]
    fraction[-1] = 1.0
    return fraction


def dream_counts(n, steps):
    """Positions the top-k algorithms commit per step in a window of n masks: int(M_j * fraction_j),
    M_j the masks left before step j (int() floors, so a step can commit none)."""
    counts = []
    for fraction in dream_fractions(steps):
        counts.append(int((n - sum(counts)) * fraction))
    return counts


DREAM_ALGS = {"maskgit_plus": "confidence", "topk_margin": "margin", "entropy": "neg_entropy", "origin": None}


class DreamScheduleDecoder(BlockDecoder):
    """Dream's own sampler (Dream-org/Dream generation_utils.py, diffusion_generate), per window.

    At step j of a window's s = steps_per_block steps, with M_j masks left in it: alg "maskgit_plus"
    (probability of the proposed token), "topk_margin" (q1 - q2) or "entropy" (sum q ln q) commits
    the int(M_j * (1 - t[j+1] / t[j])) best masked positions by that score (`dream_counts`); "origin"
    commits each masked position independently with probability 1 - t[j+1] / t[j], drawn as Dream
    draws (`origin`: the same seed gives Dream's tokens); the last step commits all that is left. A
    step can commit nothing (Dream spends the forward anyway), so NFE = steps, except that origin
    stops when its window is empty (Dream runs all its steps, the later ones on a sequence without
    masks). Tokens and q come from Dream's sample_tokens (`dream_proposal`: temperature and top-p, no
    top-k) for every model family. Dream runs one window over the whole generation; with
    block_length < gen_length the schedule runs in each block with steps / blocks steps. M_j is the
    row's own count (Dream takes the batch mean, the same while rows move in step). Default alg
    maskgit_plus; Dream's generation_config has origin.
    """

    def __init__(self, mask_id, temperature=0.0, top_p=None, alg="maskgit_plus"):
        super().__init__(mask_id, temperature, top_p)
        if alg not in DREAM_ALGS:
            raise ValueError(f"dream_schedule alg is {', '.join(DREAM_ALGS)}; got {alg!r}")
        self.alg = alg

    def info(self, gen_length, steps, block_length):
        if self.alg == "origin":
            return dict(alg=self.alg, eps=DREAM_EPS, position_score="random (origin)")
        counts = dream_counts(block_length, steps // (gen_length // block_length))
        return dict(alg=self.alg, eps=DREAM_EPS, position_score=DREAM_ALGS[self.alg], empty_steps=counts.count(0),
                    last_step_commits=counts[-1])

    def start(self, batch):
        batch.fraction = dream_fractions(batch.steps_per_block).to(batch.device)

    def select(self, logits, candidates, k, step, batch):
        fraction = batch.fraction[step.clamp(max=batch.steps_per_block - 1)]
        if self.alg == "origin":
            return self.origin(logits, candidates, fraction, batch)
        tokens, q = dream_proposal(choosable(logits, batch.model), self.temperature, self.top_p)
        n = (candidates.sum(1) * fraction).long()
        conf = torch.gather(q, -1, tokens[..., None]).squeeze(-1)
        return top_k_commit(POSITION_SCORES[DREAM_ALGS[self.alg]](q, tokens, conf), candidates, n), tokens

    def origin(self, logits, candidates, fraction, batch):
        """Dream's alg "origin" with Dream's draws: one torch.rand number per masked position of the
        windows, in row-major order across the batch (Dream's torch.rand over x[mask_index]), then
        tokens drawn for the positions that move, in the same order (Dream's sample_tokens on them)."""
        draw = torch.rand(int(candidates.sum()), device=candidates.device)
        move = torch.zeros_like(candidates)
        move[candidates] = draw < fraction[:, None].expand_as(candidates)[candidates]
        tokens = torch.full(candidates.shape, self.mask_id, dtype=torch.long, device=candidates.device)
        if move.any():
            tokens[move] = dream_proposal(choosable(logits[move], batch.model), self.temperature, self.top_p)[0]
        return move, tokens


register_method("dream_schedule", DreamScheduleDecoder, method_type="schedule", representative_param="k",
                uses_steps=True, position_score="by alg: confidence (default), margin, neg_entropy, random (origin)",
                summary="commit int(M * (1 - t_{j+1}/t_j)) positions per step, t = linspace(1, 1e-3, steps + 1)",
                reference="Dream-org/Dream generation_utils.py (diffusion_generate)")

from . import calibrated  # noqa: E402,F401  (registers pc_sampler, localleap, credit, sched)
from . import verifying  # noqa: E402,F401  (registers wino, saber, freedave)
from . import blockdecoders  # noqa: E402,F401  (registers sdar, llada2, fastdllm_v2)
