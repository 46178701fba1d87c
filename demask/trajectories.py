"""Decoding traces: when each generated position was committed, recorded by the harness from the
model handle's view of x, and the order statistics of a run.

A trace is one JSON object per sample, the `trace` field of its record in samples.jsonl:

    forwards     the forwards counted for the sample (= the record's `steps`)
    computed     [full, partial, positions, exact positions]: the sample's rows the model computed
                 in full and in part (--cache), the positions it computed, and those an exact forward
                 of the same rows would have computed (every position of the input; guidance rows
                 count as rows of their sample)
    tokens       the final generated ids, gen_length of them (padding after the answer included)
    commit_step  per generated position, the forward f (0-based, counted per sample) whose logits
                 preceded the final token: the token is in the input of the sample's next forward,
                 or in the result; -1 when the final token was in place before the first forward
    confidence   per position, the fp32 probability of the final token under forward f's logits
                 (4 significant digits); null when forward f did not compute that position
                 (query_idx left it out) or the decoder changed those logits in place
    undone       [position, token, commit_step, removed_step] per token that a remasking decoder
                 re-masked or overwrote after forward removed_step (commit_step as above)

Forward indices advance by the forwards a call counts (k for a guidance call of k·B rows).
"""
import json
import math
import os

import numpy as np
import torch

# ---------------------------------------------------------------------------
# Recording


def tensor_version(t):
    """The in-place modification counter of a tensor (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


class Recorder:
    """The traces of one decoder call. `forward` sees every forward's input and the forwards it
    counts per row (before the model runs, so that the previous logits are let go first),
    `returned` the logits handed back for it, `finish` the result. A change of x between two
    forwards (or between the last forward and the result) belongs to the earlier forward."""

    def __init__(self, rows, gen_length, mask_id):
        self.G, self.mask_id = gen_length, mask_id
        self.counted = torch.zeros(rows, dtype=torch.long)
        self.at = torch.full((rows,), -1, dtype=torch.long)
        self.state, self.seen = None, None
        self.commit_step = [[-1] * gen_length for _ in range(rows)]
        self.confidence = [[None] * gen_length for _ in range(rows)]
        self.undone = [[] for _ in range(rows)]
        self.work = torch.zeros(rows, 4, dtype=torch.long)

    def forward(self, x, counted):
        gen = x[:len(self.counted), -self.G:]
        if self.state is not None:
            self.record(gen)
        self.state, self.seen = gen.clone(), None
        self.at = torch.where(counted > 0, self.counted, self.at)
        self.counted += counted

    def returned(self, logits, query_idx, width):
        self.seen = (logits, tensor_version(logits), query_idx, width)

    def computed(self, work, width):
        """What the model computed for the last call: [(rows of the call as indices or a bool mask,
        positions per row)]."""
        for rows, positions in work:
            rows = torch.as_tensor(rows).cpu()
            samples = (rows.nonzero().squeeze(1) if rows.dtype == torch.bool else rows) % len(self.counted)
            count = torch.bincount(samples, minlength=len(self.counted))
            self.work[:, 0 if int(positions) >= width else 1] += count
            self.work[:, 2] += int(positions) * count
            self.work[:, 3] += width * count

    def finish(self, x):
        gen = x[:, -self.G:]
        if self.state is not None:
            self.record(gen)
        return [dict(forwards=int(n), tokens=tokens, commit_step=steps, confidence=conf, undone=undone, computed=work)
                for n, tokens, steps, conf, undone, work in zip(self.counted.tolist(), gen.tolist(), self.commit_step,
                                                                self.confidence, self.undone, self.work.tolist())]

    def record(self, after):
        changed = self.state != after
        if not bool(changed.any()):
            return
        rows, pos = changed.nonzero(as_tuple=True)
        old, new = self.state[rows, pos], after[rows, pos]
        written = new != self.mask_id
        conf = iter(self.probabilities(rows[written], pos[written], new[written]))
        steps = self.at.to(rows.device)[rows]
        for r, i, was, f, w in zip(rows.tolist(), pos.tolist(), old.tolist(), steps.tolist(), written.tolist()):
            if was != self.mask_id:
                self.undone[r].append([i, was, self.commit_step[r][i], f])
            self.commit_step[r][i] = f if w else -1
            self.confidence[r][i] = next(conf) if w else None

    def probabilities(self, rows, pos, tokens):
        """fp32 probabilities of `tokens` at generated positions `pos` of `rows` under the logits
        of the latest forward; None where they were not computed or were changed in place."""
        logits, version, query_idx, width = self.seen
        if tensor_version(logits) != version:
            return [None] * len(rows)
        columns = pos + width - self.G
        if query_idx is None:
            found = torch.ones_like(rows, dtype=torch.bool)
        else:
            match = query_idx.to(rows.device)[rows] == columns[:, None]
            found, columns = match.any(1), match.int().argmax(1)
        p = torch.softmax(logits[rows, columns].float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
        return [float(f"{v:.4g}") if ok else None for v, ok in zip(p.tolist(), found.tolist())]

# ---------------------------------------------------------------------------
# Order statistics


def kendall_tau_b(x, y):
    """Kendall's tau-b with ties: (concordant - discordant) / sqrt(pairs untied in x * pairs untied
    in y); nan when either side has no untied pair."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx, dy = np.sign(x[:, None] - x[None]), np.sign(y[:, None] - y[None])
    untied = float(np.count_nonzero(dx)) * float(np.count_nonzero(dy))
    return float((dx * dy).sum() / math.sqrt(untied)) if untied else math.nan


def average_ranks(a):
    """Ranks from 0, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def spearman_rho(x, y):
    """Spearman's rho: Pearson's r of the average ranks; nan when either side is constant."""
    rx, ry = average_ranks(np.asarray(x)) - (len(x) - 1) / 2.0, average_ranks(np.asarray(y)) - (len(y) - 1) / 2.0
    norm = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / norm) if norm else math.nan


def order_correlations(commit_step):
    """(tau, rho) between the commit steps in position order and the same steps sorted, over the
    positions committed at a forward: ParallelBench's decoding-order correlation (1 for any
    left-to-right order, parallel commits of neighbours included; -1 for right to left)."""
    steps = [s for s in commit_step if s >= 0]
    ideal = sorted(steps)
    return kendall_tau_b(ideal, steps), spearman_rho(ideal, steps)


def tokens_per_forward(trace):
    """Tokens written after each of the sample's forwards (re-commits of a remasking decoder included)."""
    steps = [s for s in trace["commit_step"] if s >= 0] + [u[2] for u in trace["undone"] if u[2] >= 0]
    return np.bincount(np.asarray(steps, dtype=np.int64), minlength=trace["forwards"]).tolist()


def order_summary(traces):
    """The run's order statistics: tau and rho averaged over the samples where they are defined,
    tokens written per forward over all forwards of all samples, undone tokens per sample."""
    pairs = [order_correlations(t["commit_step"]) for t in traces]
    forwards = sum(t["forwards"] for t in traces)

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else None
    return dict(kendall_tau=mean([p[0] for p in pairs]), spearman_rho=mean([p[1] for p in pairs]),
                tokens_per_forward=sum(sum(tokens_per_forward(t)) for t in traces) / forwards if forwards else None,
                undone_per_sample=float(np.mean([len(t["undone"]) for t in traces])) if traces else None,
                n_traces=len(traces), n_order_undefined=sum(math.isnan(p[0]) for p in pairs))


IMPROBABLE = 1e-4


def improbable_commits(traces, floor=IMPROBABLE):
    """The share of final generated tokens whose probability under the logits of the forward that
    preceded their commit was below `floor`, or is unknown: the position was not returned by that
    forward, the decoder changed those logits in place, or the token was written before the first
    forward. None without traces. A warning, not a rule: guidance and remasking decoders can commit
    such tokens honestly."""
    confidences = [c for t in traces for c in t["confidence"]]
    if not confidences:
        return None
    return sum(c is None or c < floor for c in confidences) / len(confidences)


# ---------------------------------------------------------------------------
# Reading


def traced_samples(run_dir):
    """The records of a finished run (samples.jsonl) that have a trace (runs before tracing have none)."""
    path = os.path.join(run_dir, "samples.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "trace" in r]
