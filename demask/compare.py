"""Paired statistics for two runs on the same samples (issue #26 item 4; docs/compare.md).

`compare RUN_A RUN_B` (custom_demask_eval.py) and the report's `≈` mark (demask/report.py) use this.
Differences are always B − A (the second run minus the first): positive means B scores higher
(or, for avg_steps, B spends more forwards).

What is compared, per item (sample id):
- the metric: `correct` (1 or 0) of math / gsm8k (accuracy) and code (pass@1) records; `rep2` of text
  records (lower is less repetitive; no McNemar then);
- `steps`: the forwards the sample counted (its mean is avg_steps).

Where the items come from: each run's records as the harness's strict reader gives them
(demask/records.py), checked and re-judged by demask/verdicts.py `read_checked`, exactly as the
report reads them: math and text verdicts are recomputed from the generation (cheap), code verdicts
go through the verdict cache (a program whose cached verdict confirms its record is not run again;
any other runs in the sandbox). summary.json is never read; config.json gives the run's settings
(task, data file, limit: its sample set, the forward limit of the checks).

The statistics:
- `paired_bootstrap`: resample the item indices with replacement (the same resamples for the metric
  and the steps), B = 10,000 by default, a fixed seed; the percentile interval of the resampled mean
  differences (95 % by default).
- `mcnemar_exact`: the exact two-sided McNemar test for a binary metric: under "A and B are equally
  good", each discordant item (one correct, the other not) is B's win with probability 1/2, so the
  smaller discordant count is Binomial(b + c, 1/2); p = min(1, 2 P(X <= min(b, c))), computed with
  integers (math.comb), 1.0 without discordant items.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from . import verdicts
from .tasks import TASKS, InputError, TextTask

N_BOOT = 10_000
SEED = 0
LEVEL = 0.95
CHUNK = 1 << 22  # resampled indices drawn at a time (32 MiB): any number of items in bounded memory


class Mismatch(ValueError):
    """Two runs whose items cannot be paired: different tasks, data files or sample sets."""


# ---------------------------------------------------------------------------
# Statistics


def mcnemar_exact(b, c):
    """Exact two-sided McNemar p-value from the discordant counts b (only A right) and c (only B
    right): min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c)); 1.0 when b + c = 0."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def bootstrap_means(columns, n_boot=N_BOOT, seed=SEED):
    """Means of `columns` ([k, n] or [n]: k per-item series over the same n items) over n_boot
    resamples of the item indices with replacement, the same resamples for every column:
    [k, n_boot] (or [n_boot]). Deterministic for a given (n, n_boot, seed)."""
    data = np.asarray(columns, dtype=np.float64)
    single = data.ndim == 1
    data = np.atleast_2d(data)
    n = data.shape[1]
    if n == 0:
        raise ValueError("no items to resample")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng, out = np.random.default_rng(seed), np.empty((data.shape[0], n_boot))
    rows = max(1, CHUNK // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        for j, column in enumerate(data):
            out[j, start:stop] = column[idx].mean(axis=1)
    return out[0] if single else out


def percentile_interval(means, level=LEVEL):
    """The percentile interval (np.percentile, linear) holding `level` of the resampled means."""
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(np.asarray(means, dtype=np.float64), [tail, 100.0 - tail])
    return float(lo), float(hi)


def paired_bootstrap(a, b, n_boot=N_BOOT, seed=SEED, level=LEVEL):
    """(mean of b - a, (lo, hi)): the observed mean difference B − A over paired items and its
    percentile bootstrap interval."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return float(diff.mean()), percentile_interval(bootstrap_means(diff, n_boot, seed), level)


def interval_holds_zero(a, b, n_boot=N_BOOT, seed=SEED, level=LEVEL):
    """Whether the paired bootstrap interval of B − A holds 0 (endpoints included): B is not
    significantly different from A at `level`. The report's `≈` mark."""
    _, (lo, hi) = paired_bootstrap(a, b, n_boot, seed, level)
    return lo <= 0.0 <= hi


# ---------------------------------------------------------------------------
# A run's items


class RunItems(NamedTuple):
    """What a comparison reads of one run: its settings and, per sample id, the metric and steps."""
    dir: str
    run: object          # RunSettings
    metric: str          # accuracy, pass@1 or rep2
    binary: bool         # the metric is a 0/1 verdict (McNemar applies)
    values: dict         # id -> float (1.0 / 0.0 for binary metrics)
    steps: dict          # id -> int


def metric_of(task):
    """(metric name, binary) of a task's per-item verdict."""
    return ("rep2", False) if isinstance(task, TextTask) else (task.final, True)


def items_of(task, records):
    """(metric, binary, {id: value}, {id: steps}) of checked records (verdicts.read_checked)."""
    metric, binary = metric_of(task)
    field_name = "rep2" if not binary else "correct"
    values = {r["id"]: float(r[field_name]) for r in records}
    return metric, binary, values, {r["id"]: int(r["steps"]) for r in records}


def read_items(run_dir, cache=None):
    """A run directory's items: config.json's settings, its records checked and re-judged
    (verdicts.read_checked; code through the verdict `cache`). An InputError when the run cannot be
    read: no or broken config.json, an unknown task, a record that fails the checks, no records."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        run = verdicts.settings_from_config(cfg)
        if run.task not in TASKS:
            raise ValueError(f"unknown task {run.task!r}")
        task = TASKS[run.task]()
        samples = task.load(run)[:run.limit]
        records = verdicts.read_checked(run_dir, run, task, samples, cache=cache)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputError(f"{path}: {type(e).__name__}: {e}") from None
    if not records:
        raise InputError(f"{run_dir}: no sample records (samples.jsonl)")
    metric, binary, values, steps = items_of(task, records)
    return RunItems(run_dir, run, metric, binary, values, steps)


# ---------------------------------------------------------------------------
# Comparison


@dataclass
class Comparison:
    """Two runs on the same items; every difference is B − A."""
    a: dict                 # run, label, decoder, metric mean, avg_steps
    b: dict
    task: str
    data: str
    n_items: int
    metric: str
    binary: bool
    diff: float             # mean of B − A over items
    ci: tuple               # its bootstrap interval
    a_only: int | None      # binary: items only A got right
    b_only: int | None      # binary: items only B got right
    mcnemar_p: float | None
    b_higher: int           # items where B's value is above A's (binary: b_only)
    b_lower: int
    steps_diff: float
    steps_ci: tuple
    n_boot: int
    seed: int
    level: float

    def to_json(self):
        out = asdict(self)
        out["ci"], out["steps_ci"] = list(self.ci), list(self.steps_ci)
        out["sign"] = "B - A"
        out["interval"] = "percentile bootstrap over items, paired"
        return out


def check_pairable(a, b):
    """A Mismatch unless a and b (RunItems) are on the same task, data file and sample ids."""
    if a.run.task != b.run.task:
        raise Mismatch(f"the runs are on different tasks ({a.run.task} and {b.run.task})")
    if a.run.data != b.run.data:
        raise Mismatch(f"the runs read different data files ({a.run.data} and {b.run.data})")
    differ = set(a.values) ^ set(b.values)
    if differ:
        raise Mismatch(f"the runs are on different sample sets: {len(differ)} sample id(s) are in only one "
                       f"of them ({len(a.values)} records in A, {len(b.values)} in B)")


def compare_items(a, b, n_boot=N_BOOT, seed=SEED, level=LEVEL):
    """The Comparison of two RunItems (Mismatch when they cannot be paired)."""
    check_pairable(a, b)
    ids = sorted(a.values)
    va, vb = np.array([a.values[i] for i in ids]), np.array([b.values[i] for i in ids])
    sa, sb = np.array([a.steps[i] for i in ids], float), np.array([b.steps[i] for i in ids], float)
    means = bootstrap_means(np.stack([vb - va, sb - sa]), n_boot, seed)
    ci, steps_ci = percentile_interval(means[0], level), percentile_interval(means[1], level)
    higher, lower = int(np.sum(vb > va)), int(np.sum(vb < va))

    def side(r, values, steps):
        return dict(run=r.dir, label=r.run.label, decoder=r.run.decoder, decoder_args=dict(r.run.decoder_args),
                    **{r.metric: float(values.mean())}, avg_steps=float(steps.mean()))
    return Comparison(
        a=side(a, va, sa), b=side(b, vb, sb), task=a.run.task, data=a.run.data, n_items=len(ids),
        metric=a.metric, binary=a.binary, diff=float((vb - va).mean()), ci=ci,
        a_only=lower if a.binary else None, b_only=higher if a.binary else None,
        mcnemar_p=mcnemar_exact(lower, higher) if a.binary else None, b_higher=higher, b_lower=lower,
        steps_diff=float((sb - sa).mean()), steps_ci=steps_ci, n_boot=int(n_boot), seed=int(seed), level=float(level))


def compare_runs(dir_a, dir_b, n_boot=N_BOOT, seed=SEED, level=LEVEL, cache=None):
    """Read both run directories (read_items) and compare them (compare_items)."""
    cache = cache or verdicts.VerdictCache()
    return compare_items(read_items(dir_a, cache), read_items(dir_b, cache), n_boot, seed, level)


def format_comparison(c):
    """The human-readable block of a Comparison."""
    pct = f"{100 * c.level:g} %"

    def name(side):
        args = ",".join(f"{k}={v}" for k, v in side["decoder_args"].items())
        return side["decoder"] + (f" {args}" if args else "")
    lines = [f"A: {c.a['run']} ({name(c.a)})", f"B: {c.b['run']} ({name(c.b)})",
             f"{c.task} ({c.data}), {c.n_items} paired items; differences are B − A; {pct} intervals: paired "
             f"bootstrap over items ({c.n_boot} resamples, seed {c.seed}, percentile)",
             f"{c.metric:<9}  A {c.a[c.metric]:.4f}  B {c.b[c.metric]:.4f}  B − A {c.diff:+.4f}  "
             f"[{c.ci[0]:+.4f}, {c.ci[1]:+.4f}]"]
    if c.binary:
        lines.append(f"{'':9}  items right only in A: {c.a_only}, only in B: {c.b_only}; "
                     f"McNemar exact p = {c.mcnemar_p:.4g}")
    else:
        lines.append(f"{'':9}  items where B is higher: {c.b_higher}, lower: {c.b_lower} "
                     "(no McNemar: not a 0/1 metric)")
    lines.append(f"{'avg_steps':<9}  A {c.a['avg_steps']:.2f}  B {c.b['avg_steps']:.2f}  B − A {c.steps_diff:+.2f}  "
                 f"[{c.steps_ci[0]:+.2f}, {c.steps_ci[1]:+.2f}]")
    return "\n".join(lines)
