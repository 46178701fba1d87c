"""Decoders that re-score positions or exit early (2025-26 rules, issue #28).

PC-Sampler re-scores positions (position decay x frequency-calibrated confidence), LocalLeap relaxes
the confidence threshold next to confident anchors, CreditDecoding fuses accumulated trace credit into
the logits before a threshold, SchED exits early once the mean top-2 logit margin of the generation
passes a threshold that falls with progress. Each is a `BlockDecoder` (per-row windows, rule checks,
forwards counted by the model handle) registered at the end of this module; demask/decoders.py
imports it for that side effect.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

from . import REPO
from .decoders import BlockDecoder, Range, clean_confidence, register_method, top_k_commit

# ---------------------------------------------------------------------------
# PC-Sampler

# The reference corpus of the "data" prior: the bundled tiny model's training files (general text,
# math word problems, code) with the fields whose text is counted, as PC-Sampler's counting script
# joins them ("value " per key).
REFERENCE_CORPUS = (("data/tiny_math_train.jsonl", ("problem", "solution")),
                    ("data/tiny_code_train.jsonl", ("prompt", "canonical_solution")),
                    ("data/tiny_text_train.jsonl", ("text",)))


def corpus_counts(tokenizer):
    """(token counts {id: n}, total) of REFERENCE_CORPUS under `tokenizer` (no special tokens added)."""
    texts = []
    for path, keys in REFERENCE_CORPUS:
        with open(os.path.join(REPO, path)) as f:
            for line in f:
                row = json.loads(line)
                texts.append("".join(f"{row[k]} " for k in keys if isinstance(row.get(k), str)))
    counts = {}
    for ids in tokenizer(texts, add_special_tokens=False).input_ids:
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    return counts, sum(counts.values())


def read_prior_file(path):
    """(counts, total) from a JSON in PC-Sampler's format: {"num_token": N, "p_baseline_dict": {id: count}}."""
    with open(path) as f:
        data = json.load(f)
    return {int(k): v for k, v in data["p_baseline_dict"].items()}, data["num_token"]


PRIOR_COUNTS = {}  # (source, tokenizer name and size) -> (counts, total): counted once per process


def token_prior(source, tokenizer, width):
    """[width] float64 background frequency of each token id: count / total, 1 / total for ids the
    corpus never holds (PC-Sampler's load_baseline); uniform 1 / width without a tokenizer."""
    if tokenizer is None and source == "data":
        return torch.full((width,), 1.0 / width, dtype=torch.float64)
    key = (source, getattr(tokenizer, "name_or_path", None), None if tokenizer is None else len(tokenizer))
    if key not in PRIOR_COUNTS:
        PRIOR_COUNTS[key] = corpus_counts(tokenizer) if source == "data" else read_prior_file(source)
    counts, total = PRIOR_COUNTS[key]
    prior = torch.full((width,), 1.0 / total, dtype=torch.float64)
    ids = torch.tensor([i for i in counts if i < width], dtype=torch.long)
    prior[ids] = torch.tensor([counts[int(i)] for i in ids], dtype=torch.float64) / total
    return prior


class PCSamplerDecoder(BlockDecoder):
    """PC-Sampler (Huang et al., arXiv 2508.13021; NEUIR/PC-Sampler src/generate.py,
    generate_with_pc_sampler): top-k with the uniform schedule by

        score_i = exp(-decay * i) * min(-c_i * log(f(x_i) + 1e-9), alpha)

    with i the position within the window, c_i the confidence of the proposed token x_i and f its
    background frequency in a reference corpus (the prior). One forward per step, NFE = steps.

    prior "data": counts of the bundled tiny model's training files (REFERENCE_CORPUS) under the run's
    tokenizer, built as PC-Sampler's utils/calculate_p_baseline.py builds its reference_corpus.json
    from general text, math problems and evaluation data; a path: a JSON in that file's format (for
    LLaDA-8B, PC-Sampler's data/baseline/reference_corpus_llada.json). Defaults lambda 0.25, alpha 10
    (scripts/eval_pc_sampler.sh, LLaDA-8B-Instruct GSM8K/MATH-500/HumanEval).
    Deviations: scores in float64 (upstream float32); the proposed token is never the mask id or a
    padded column (upstream's argmax may pick them); positions count from the window's start, as
    upstream's code does (the paper's i - |p0| counts from the generation's start; the same when the
    window is the generation, as in all its scripts); without a tokenizer the prior is uniform.
    """
    ranges = {**BlockDecoder.ranges, "decay": Range(0), "alpha": Range(0, open_low=True)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, decay=0.25, alpha=10.0, prior="data"):
        super().__init__(mask_id, temperature, top_p)
        if prior != "data" and not os.path.isfile(prior):
            raise ValueError(f"pc_sampler prior is 'data' or a JSON file; {prior!r} not found")
        self.decay, self.alpha, self.prior = float(decay), float(alpha), prior

    def info(self, gen_length, steps, block_length):
        corpus = ", ".join(path for path, _ in REFERENCE_CORPUS) if self.prior == "data" else self.prior
        return dict(prior=corpus, decay=self.decay, alpha=self.alpha)

    def start(self, batch):
        batch.prior = None

    def select(self, logits, candidates, k, step, batch):
        if batch.prior is None:
            tokenizer = getattr(batch.model, "tokenizer", None)
            batch.prior = token_prior(self.prior, tokenizer, logits.shape[-1]).to(logits.device)
        tokens, p, conf = self.propose(logits, batch)
        salience = (-conf * torch.log(batch.prior[tokens] + 1e-9)).clamp(max=self.alpha)
        where = torch.arange(candidates.shape[1], device=candidates.device, dtype=torch.float64)
        return top_k_commit(torch.exp(-self.decay * where) * salience, candidates, k), tokens


# ---------------------------------------------------------------------------
# LocalLeap


def near_anchor(anchors, radius):
    """[B, Q] bool: within `radius` positions of an anchor (query columns are consecutive positions)."""
    if radius < 1:
        return anchors
    dilated = F.max_pool1d(anchors[:, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return dilated[:, 0].bool()


class LocalLeapDecoder(BlockDecoder):
    """LocalLeap (arXiv 2510.07081; friedrichor/LocalLeap llada/generate.py, get_transfer_index with
    threshold and relaxed_threshold): per forward, anchors are the masked window positions with
    confidence >= threshold; a masked position within `radius` of an anchor is committed when its
    confidence >= relaxed_threshold, any other when >= threshold; the most confident masked position
    is always committed. Without an anchor it is Fast-dLLM's threshold rule. The window loops until
    it has no mask (`steps` is not used); NFE is what it spends. Defaults 0.9 / 0.75 / 4 (the
    authors' LLaDA-8B-Instruct GSM8K example).
    Deviations: the proposed token is never the mask id or a padded column (upstream's argmax may pick
    them); ties for the most confident position go to the lower position (torch.topk's order upstream);
    upstream decodes one row at a time, here every row of a batch keeps its own window.
    """
    ranges = {**BlockDecoder.ranges, "threshold": Range(0, 1), "relaxed_threshold": Range(0, 1), "radius": Range(0)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, threshold=0.9, relaxed_threshold=0.75, radius=4):
        super().__init__(mask_id, temperature, top_p)
        if int(radius) != radius:
            raise ValueError(f"localleap radius must be a whole number of positions, got {radius!r}")
        self.threshold, self.relaxed_threshold, self.radius = float(threshold), float(relaxed_threshold), int(radius)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, _ = self.propose(logits, batch)
        conf = clean_confidence(p, tokens)
        anchors = candidates & (conf >= self.threshold)
        bar = torch.where(near_anchor(anchors, self.radius), self.relaxed_threshold, self.threshold)
        best = top_k_commit(conf, candidates, torch.ones_like(k))
        return best | (candidates & (conf >= bar)), tokens


# ---------------------------------------------------------------------------
# CreditDecoding


class CreditDecoder(BlockDecoder):
    """CreditDecoding (Wang et al., arXiv 2510.06133; inclusionAI/dInfer
    python/dinfer/decoding/parallel_strategy.py, CreditThresholdParallelDecoder): per window a trace
    credit C [Q, V] (float32) starts at zero; at each forward C is first multiplied by decay_beta
    (not at the window's first forward), then every masked position adds p_top1 ** boost_gamma at its
    top-1 token; the logits become logits + credit_alpha * log(C + 1). On those fused logits the
    threshold rule commits every masked position with confidence >= min(threshold, max confidence -
    1e-5) (so at least the most confident one). The window loops until it has no mask (`steps` is not
    used); NFE is what it spends. Defaults: dInfer's credit_alpha 0.7, boost_gamma 0.2, decay_beta 0.8;
    threshold 0.9 (Fast-dLLM's).
    Deviations: the proposed token is never the mask id or a padded column (dInfer proposes the argmax
    of all columns and leaves a position whose argmax is the mask id uncommitted); dInfer's engine
    options are left out: its EOS early stop (filling every later block with EOS once a block holds
    one, which breaks window order) and its loop unrolling (up to 4 forwards before the mask check,
    which spends forwards on an empty window); confidence in float64 (dInfer float32).
    """
    ranges = {**BlockDecoder.ranges, "threshold": Range(0, 1), "credit_alpha": Range(0), "boost_gamma": Range(0),
              "decay_beta": Range(0, 1)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, threshold=0.9, credit_alpha=0.7, boost_gamma=0.2,
                 decay_beta=0.8):
        super().__init__(mask_id, temperature, top_p)
        self.threshold, self.credit_alpha = float(threshold), float(credit_alpha)
        self.boost_gamma, self.decay_beta = float(boost_gamma), float(decay_beta)

    def start(self, batch):
        batch.credit = None

    def fuse(self, logits, candidates, step, batch):
        """The logits with the trace credit of each row's window (updated by this forward)."""
        if batch.credit is None:
            batch.credit = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        credit = batch.credit
        credit[step == 0] = 0.0
        credit.mul_(torch.where(step > 0, self.decay_beta, 1.0).to(credit)[:, None, None])
        top1, index = F.softmax(logits.float(), dim=-1).max(dim=-1)
        credit.scatter_add_(2, index[..., None], (top1.pow(self.boost_gamma) * candidates)[..., None])
        return logits + self.credit_alpha * torch.log(credit + 1)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, _ = self.propose(self.fuse(logits, candidates, step, batch), batch)
        conf = torch.where(candidates, clean_confidence(p, tokens), -torch.inf)
        bar = (conf.max(dim=1, keepdim=True).values - 1e-5).clamp(min=-1000, max=self.threshold)
        return candidates & (conf >= bar), tokens


# ---------------------------------------------------------------------------
# SchED

SCHED_SCHEDULES = ("linear", "cosine", "exp")


def sched_threshold(progress, tau_high, tau_low, schedule, k):
    """SchED's non-increasing threshold at progress p in [0, 1]: linear tau_high + (tau_low - tau_high) p;
    cosine tau_low + (tau_high - tau_low) (1 + cos(pi p)) / 2; exp tau_low + (tau_high - tau_low) e^(-k p)."""
    p = progress.clamp(0.0, 1.0)
    if schedule == "linear":
        return tau_high + (tau_low - tau_high) * p
    if schedule == "cosine":
        return tau_low + (tau_high - tau_low) * (1 + torch.cos(math.pi * p)) / 2
    return tau_low + (tau_high - tau_low) * torch.exp(-k * p)


class SchedDecoder(BlockDecoder):
    """SchED (Mohamed et al., arXiv 2512.02892; no public code found): confidence top-k with the
    uniform schedule; at each forward the mean top-1 minus top-2 raw-logit margin over the whole
    generation (the answer region, masked or not) is compared with tau(p), p = (this row's forwards so
    far) / steps, a smooth non-increasing schedule from tau_high to tau_low (`sched_threshold`). Once
    the margin reaches tau(p) the row exits: the rest of its current window is committed (proposed
    tokens) at that forward, and every later window of the row is committed whole at its first forward.
    Defaults: tau_high 7.5, tau_low 2.5, exp with k = 4 (the setting reported for LLaDA-8B-Instruct).
    Deviations: SchED fills every remaining position at the exit; the harness's window order allows only
    the current window, so each later window costs one forward (and sees the windows filled before it).
    """
    whole_generation = True
    ranges = {**BlockDecoder.ranges, "tau_high": Range(0), "tau_low": Range(0), "k": Range(0, open_low=True)}

    def __init__(self, mask_id, temperature=0.0, top_p=None, tau_high=7.5, tau_low=2.5, schedule="exp", k=4.0):
        super().__init__(mask_id, temperature, top_p)
        if schedule not in SCHED_SCHEDULES or tau_low > tau_high:
            raise ValueError(f"sched: schedule is one of {', '.join(SCHED_SCHEDULES)} and tau_low <= tau_high")
        self.tau_high, self.tau_low, self.schedule, self.k = float(tau_high), float(tau_low), schedule, float(k)

    def info(self, gen_length, steps, block_length):
        return dict(schedule=self.schedule, tau_high=self.tau_high, tau_low=self.tau_low,
                    k=self.k if self.schedule == "exp" else None, answer_region="whole generation", fill="window")

    def start(self, batch):
        batch.forwards = torch.zeros(batch.size, dtype=torch.long, device=batch.device)
        batch.exited = torch.zeros(batch.size, dtype=torch.bool, device=batch.device)

    def select(self, logits, candidates, k, step, batch):
        tokens, p, conf = self.propose(logits, batch)
        active = candidates.any(1)
        batch.forwards += active.long()
        top2 = logits.topk(2, dim=-1).values.to(torch.float64)
        margin = (top2[..., 0] - top2[..., 1]).mean(1)
        tau = sched_threshold(batch.forwards.to(torch.float64) / batch.steps, self.tau_high, self.tau_low,
                              self.schedule, self.k)
        batch.exited |= active & (margin >= tau)
        normal = top_k_commit(conf, candidates, k)
        return torch.where(batch.exited[:, None], candidates, normal), tokens


# ---------------------------------------------------------------------------
# Registry

register_method("pc_sampler", PCSamplerDecoder, method_type="topk", representative_param="decay",
                position_score="pc_sampler: exp(-decay * i) * min(-c log f_prior, alpha)",
                summary="top-k by position decay times frequency-calibrated confidence",
                reference="Huang et al. arXiv 2508.13021 (NEUIR/PC-Sampler src/generate.py)")
register_method("localleap", LocalLeapDecoder, method_type="threshold", representative_param="relaxed_threshold",
                position_score="confidence",
                summary="threshold, relaxed within radius of a confident anchor (at least the best position)",
                reference="arXiv 2510.07081 (friedrichor/LocalLeap llada/generate.py)")
register_method("credit", CreditDecoder, method_type="threshold", representative_param="threshold",
                position_score="confidence of credit-fused logits",
                summary="threshold on logits + alpha log(1 + decayed trace credit)",
                reference="Wang et al. arXiv 2510.06133 (inclusionAI/dInfer python/dinfer/decoding/parallel_strategy.py)")
register_method("sched", SchedDecoder, method_type="adaptive", representative_param="tau_low",
                position_score="confidence", uses_steps=True,
                summary="top-k; exit (fill the window, then each later window) once the mean logit margin >= tau(t/T)",
                reference="Mohamed et al. arXiv 2512.02892 (SchED; no public code)")
