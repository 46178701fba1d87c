"""Leaderboard, Pareto plots, PBx (ParallelBench), AUP (d3LLM) and decoding order from run directories.

`write_report` reads every summary.json under a results folder, re-derives each run's verdicts and
metrics from its samples.jsonl (demask/verdicts.py; a run that fails is listed, not shown), and writes report.md, report.csv,
one pareto_<label>.png per label, one order_<run>.png per shown run with a trace, and report.html
(report_html.py), in this order: collect the runs, the header, then per model and per kind of
label (accuracy, text) the leaderboard, the Pareto sections, PBx/AUP tables and the order figures.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import REPO, compare, parallelbench, report_html, trajectories, verdicts
from .decoders import DECODERS, method_config_keys, method_position_score
from .kvcache import MODES
from .tasks import TASKS, InputError, TextTask

ACCURACY_METRICS = ("accuracy", "pass@1")
TEXT_METRICS = ("gen_ppl", "mauve", "entropy", "rep2")
PB_LEVELS = (90, 80, 70, 60)
HEADER_NOTES = [
    "- acc / pass@1 / mauve in %; steps = avg_steps = model forwards per sample (NFE).",
    "- Runs of one configuration with several seeds form one cell: means, `± std` (sample std over seeds) "
    "and `n×k seeds`; the Pareto plots draw ± std error bars, and a point is called dominated only when "
    "another with no more steps has mean − std ≥ its mean + std.",
    "- tok/step = gen_length / avg_steps. Every generated position counts as decoded, EOS/padding "
    "after the answer included (ParallelBench's convention), so it overstates useful tokens for "
    "short answers.",
    "- PBx (ParallelBench): per configuration TPS = k = gen_length/steps for top-k methods (from the "
    "config), gen_length/avg_steps otherwise; PBx = the largest TPS with score >= x (— when none).",
    "- AUP (d3LLM): rho = gen_length/avg_steps, y = accuracy %, alpha = 3, y_max = best accuracy of "
    "any configuration of the label for that model; `*` = accuracy drops more than 5 points at the "
    "highest rho (d3LLM's code asserts there); computed over the pairs within 5 points of y_1.",
    "- τ / ρ: ParallelBench's decoding-order correlation, Kendall τ-b and Spearman ρ between a sample's "
    "commit steps in position order and the same steps sorted (1 = left to right, parallel commits "
    "of neighbours included; -1 = right to left), averaged over samples (the `trace` of each record in samples.jsonl).",
    "- Re-derived from each run's samples.jsonl, never read from summary.json: every verdict (re-judged from its "
    "generation by the task's judge), acc / pass@1, rep2, steps and n. A run whose records fail the checks or "
    "disagree with their judge, whose summary.json metrics differ from the re-derived ones, or that has no "
    "samples.jsonl is not shown (listed below). Not re-derived: gen_ppl, MAUVE and entropy of text runs (they "
    "need the scorer LM) are summary.json's.",
    "- `≈` after an acc / pass@1 score: not significantly different from the label's best row (the highest score, "
    "the first row on a tie): the 95 % paired bootstrap interval over items of the row's difference from it "
    "(10,000 resamples, seed 0, percentile; `compare RUN_A RUN_B`, docs/compare.md) holds 0. Only rows of one run "
    "with records on the same samples as a best row of one run are compared; the others (cells over several seeds, "
    "other sample sets, text labels) are never marked.",
]

# ---------------------------------------------------------------------------
# Runs


@dataclass
class ReportRun:
    """One run directory as the report reads it (read_run), or the cell of one configuration over
    several seeds (merge_seeds: means over the seeds' runs, `source` their newest run)."""
    dir: str                        # relative to the results folder
    root: str                       # as found under the results folder
    label: str
    decoder: str                    # the registry name the run was made with
    model: str                      # as shown: hub id, or path relative to the repository / results folder
    model_path: str                 # as recorded in the run's config (what loads its tokenizer)
    cfg: dict
    metrics: dict
    order: dict                     # summary.json's decoding-order statistics
    mtime: float
    n: int                          # samples
    avg_steps: float
    fingerprint: str | None
    name: str                       # the decoder class's `name` (decoder_info), else the registry name
    version: str | None             # code identity: summary's `code`, else (unshipped code) the fingerprint
    shipped: bool                   # the decoder class lives in the demask package
    date: str                       # run date: the run directory's timestamp, else summary.json's mtime
    family_key: tuple               # (decoder, class name, version, cache mode): never two families in one
    family: str                     # as shown, set by `name_families`: name[@hash8][ +<mode> cache][ (date)]
    kind: str                       # "accuracy" or "text"
    metric: str
    score: float | None             # the metric in %
    scorer_lm: str | None           # text labels only
    type: str                       # method type
    rep_name: str | None            # representative parameter
    rep: object                     # its value
    params: dict
    tokens_per_forward: float | None
    pb_tps: float | None
    seconds: float | None = None    # decoding seconds per sample (summary.json's cost; runs before it: None)
    score_std: float = 0.0
    n_seeds: int = 1
    source: ReportRun | None = field(default=None, repr=False)
    order_png: str | None = None    # set by order_lines on the run whose trace the figure shows
    family_name: str = ""           # the family without its date (Pareto point labels, the front line)
    family_sort: tuple = ()         # the family's place: editable decoder, registry order, name, cache, date
    summary: str = ""               # the decoder class's `summary` (decoder_info)
    traced: list = field(default_factory=list, repr=False)  # its checked records that have a trace
    items: dict = field(default_factory=dict, repr=False)   # accuracy runs: sample id -> 1.0 / 0.0 verdict (≈ mark)

    @property
    def shown(self):
        """The run whose trace the order figure and report.html show: a cell's newest run, else itself."""
        return self.source or self

    @property
    def traced_records(self):
        """The records of samples.jsonl that have a trace, as read_run read (and checked) them: once per run."""
        return self.source.traced_records if self.source else self.traced


def collect_runs(results_dir, label_defaults, run_keys):
    """Every run directory under results_dir with a readable summary.json whose metrics its
    samples.jsonl re-derives, and the others with the reason (unreadable, not re-derivable)."""
    runs, problems, rederive = [], [], Rederivation()
    for root, dirs, files in os.walk(results_dir):
        dirs.sort()
        if "summary.json" not in files:
            continue
        path = os.path.join(root, "summary.json")
        try:
            runs.append(read_run(results_dir, root, path, label_defaults, run_keys, rederive))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, InputError) as e:
            message = str(e).replace(os.path.abspath(results_dir) + os.sep, "").replace(
                os.path.normpath(results_dir) + os.sep, "")
            problems.append(f"{os.path.relpath(path, results_dir)}: {type(e).__name__}: {message}")
    return name_families(runs), problems


class Rederivation:
    """Re-derives runs for the report (demask/verdicts.py, its cheap path: no model): one task and
    sample set per (task, data, limit), one code verdict cache."""

    def __init__(self):
        self.tasks, self.cache = {}, None

    def __call__(self, root, cfg, stored):
        """(metrics, traced records, items) of the run in `root`: its records checked and re-judged, its
        metrics re-derived; summary.json's `stored` metrics must agree (else ValueError). A text
        run keeps summary.json's scorer metrics, which cannot be re-derived without the scorer LM."""
        run = verdicts.settings_from_config(cfg)
        key = (run.task, run.data, run.limit)
        if key not in self.tasks:
            task = TASKS[run.task]()
            self.tasks[key] = task, task.load(run)[:run.limit]
        task, samples = self.tasks[key]
        if not any(n.startswith("samples") and n.endswith(".jsonl") for n in os.listdir(root)):
            raise InputError("no samples.jsonl: its verdicts and metrics cannot be re-derived")
        self.cache = self.cache or verdicts.VerdictCache()
        records = verdicts.read_checked(root, run, task, samples, cache=self.cache)
        if not records:
            raise InputError("samples.jsonl holds no records: its metrics cannot be re-derived")
        derived = verdicts.cheap_metrics(task, records)
        differs = verdicts.metric_differences(stored, derived)
        if differs:
            raise ValueError("summary.json's metrics are not those of its samples: " + "; ".join(differs))
        items = compare.items_of(task, records)[2] if not isinstance(task, TextTask) else {}
        return dict(stored, **derived), [r for r in records if "trace" in r], items


def read_run(results_dir, root, path, label_defaults, run_keys, rederive=None):
    with open(path) as f:
        summary = json.load(f)
    cfg = summary["config"]
    metrics, traced, items = (rederive or Rederivation())(root, cfg, summary["metrics"])
    label, decoder = summary.get("label") or cfg["label"], summary.get("decoder") or cfg["decoder"]
    details, avg_steps = summary.get("details") or {}, float(metrics["avg_steps"])
    kind = "accuracy" if any(m in metrics for m in ACCURACY_METRICS) else "text"
    metric = next((m for m in ACCURACY_METRICS if m in metrics), "mauve")
    method_type, rep_name, rep = run_method(cfg, decoder)
    tokens_per_forward = cfg["gen_length"] / avg_steps if avg_steps > 0 else None
    info, mtime, fingerprint = cfg.get("decoder_info") or {}, os.path.getmtime(path), cfg.get("fingerprint")
    own_name, shipped = info.get("name") if isinstance(info.get("name"), str) else None, is_shipped(decoder, info)
    code = summary.get("code") or info.get("code")
    version = code or (None if shipped else fingerprint)
    return ReportRun(
        dir=os.path.relpath(root, results_dir), root=root, label=label, decoder=decoder,
        model=shown_path(str(cfg.get("model")), results_dir), model_path=str(cfg.get("model")),
        cfg=cfg, metrics=metrics, order=summary.get("order") or {}, mtime=mtime,
        n=int(metrics.get("n_samples", 0)), avg_steps=avg_steps, fingerprint=fingerprint,
        name=own_name or decoder, version=version, shipped=shipped, date=run_date(root, mtime),
        family_key=(decoder, own_name, version, cfg.get("cache", "none")), family=run_family(decoder, cfg),
        summary=info.get("summary") if isinstance(info.get("summary"), str) else "",
        kind=kind, metric=metric, score=percent(metrics.get(metric)),
        scorer_lm=scorer_lm(cfg, details) if kind == "text" else None, type=method_type, rep_name=rep_name,
        rep=rep, params=run_params(cfg, decoder, label_defaults.get(label, {}), run_keys),
        tokens_per_forward=tokens_per_forward, traced=traced, items=items, seconds=(summary.get("cost") or {}).get(
            "decode_seconds_per_sample"),
        pb_tps=cfg["gen_length"] / cfg["steps"] if method_type == "topk" else tokens_per_forward)


def run_family(decoder, cfg):
    """The decoder; cached runs form their own family, never mixed with exact ones."""
    return decoder + cache_suffix(cfg.get("cache", "none"))


def cache_suffix(cache):
    return f" +{cache} cache" if cache != "none" else ""


def is_shipped(decoder, info):
    """Whether the run's decoder class is part of the demask package (its recorded class, else the
    registry's): the editable DemaskDecoder and plugins are not."""
    module = info["cls"].rpartition(".")[0] if isinstance(info.get("cls"), str) else (
        DECODERS[decoder].cls.__module__ if decoder in DECODERS else "")
    return module == "demask" or module.startswith("demask.")


STAMP = re.compile(r"-(\d{4})(\d{2})(\d{2})-\d{6}(?:-\d+)?$")


def run_date(root, mtime):
    """YYYY-MM-DD: the timestamp that ends a single run's directory name, else the summary's mtime."""
    stamp = STAMP.search(os.path.basename(os.path.normpath(root)))
    return "-".join(stamp.groups()) if stamp else datetime.date.fromtimestamp(mtime).isoformat()


def shown_path(path, results_dir):
    """A model path as the report shows it: a hub id or relative path as recorded; an absolute path
    inside the repository relative to it, any other relative to the results folder."""
    if not os.path.isabs(path):
        return path
    path = os.path.normpath(path)
    if os.path.commonpath([path, REPO]) == REPO:
        return os.path.relpath(path, REPO)
    return os.path.relpath(path, os.path.abspath(results_dir))


def decoder_rank(decoder):
    """The editable decoder first, then the registry's order, then unregistered names."""
    names = ["default"] + [n for n in DECODERS if n != "default"]
    return names.index(decoder) if decoder in names else len(names)


def name_families(runs):
    """The runs with their family labels. A family is one decoder (registry name and class `name`)
    at one version of its code and one --cache mode: different versions are never one family. Its
    label is the class's `name`, else the registry name; `@<hash8>` and the earliest run date are
    added for the editable decoder and plugins without a `name` (their code changes between runs)
    and for every family whose name another family also has. Order: the editable decoder, then the
    registry's order; within a decoder, names by their first run, a cached family after its exact
    one, versions by date."""
    groups = {}
    for run in runs:
        groups.setdefault(run.family_key, []).append(run)
    taken = {}
    for (decoder, own_name, version, cache) in groups:
        taken[(own_name or decoder, cache)] = taken.get((own_name or decoder, cache), 0) + 1
    first_run = {}
    for run in runs:
        key = (run.decoder, run.name)
        first_run[key] = min(first_run.get(key, run.date), run.date)
    named = {}
    for key, members in groups.items():
        decoder, own_name, version, cache = key
        base, date, first = own_name or decoder, min(r.date for r in members), members[0]
        dated = taken[(base, cache)] > 1 or not (own_name or first.shipped)
        name = base + (f"@{version[:8]}" if dated and version else "") + cache_suffix(cache)
        named[key] = dict(family_name=name, family=name + (f" ({date})" if dated else ""),
                          family_sort=(decoder_rank(decoder), decoder, first_run[(decoder, base)], base,
                                       MODES.index(cache) if cache in MODES else len(MODES), date, version or ""))
    return [dataclasses.replace(r, **named[r.family_key]) for r in runs]


def percent(value):
    return None if value is None else 100.0 * float(value)


def scorer_lm(cfg, details):
    """The scorer LM a text run used: the one in its details (after a fallback), else the configured one."""
    used = details.get("scorer")
    return (used if isinstance(used, str) else None) or cfg.get("scorer")


def constructor_default(cls, name):
    try:
        param = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def run_method(cfg, name):
    """(method type, representative parameter, its value) as the run recorded them (decoder_info:
    the class's attributes, else its registry entry then), else from today's registry entry."""
    recorded = cfg.get("decoder_info") or {}
    info = DECODERS.get(name)
    kind = recorded.get("method_type") or (info.method_type if info else "custom")
    rep = recorded["representative_param"] if "representative_param" in recorded else (
        info.representative_param if info else None)
    args = cfg.get("decoder_args") or {}
    if rep == "k":
        value = cfg["gen_length"] / cfg["steps"]
    elif "representative_value" in recorded:
        value = recorded["representative_value"]
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


def run_params(cfg, name, defaults, run_keys):
    """What distinguishes the run within its label: decoder_args and the run settings the method
    uses that differ from the label's defaults (seeds are not: runs of several seeds are one row)."""
    keys = method_config_keys(name) if name in DECODERS else run_keys
    params = {k: cfg[k] for k in keys if k in run_keys and k not in ("model", "task", "data", "scorer")
              and k in cfg and k in defaults and cfg[k] != defaults[k]}
    params.update(cfg.get("decoder_args") or {})
    return dict(sorted(params.items()))


def run_position_score(run):
    """A `score` decoder argument, else what the run recorded (decoder_info), else the registry's."""
    args, recorded = run.cfg.get("decoder_args") or {}, run.cfg.get("decoder_info") or {}
    return args.get("score") or recorded.get("position_score") or (
        method_position_score(run.decoder, args) if run.decoder in DECODERS else None)


# ---------------------------------------------------------------------------
# Formatting and ordering


def params_text(params, skip=None):
    return ", ".join(f"{k}={fmt_param(v)}" for k, v in params.items() if k != skip) or "—"


def fmt(value, digits=1):
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fmt_param(value):
    return "—" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def slug(text):
    return re.sub(r"[^\w.+-]", "_", str(text)).strip("_") or "x"


def sort_value(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def row_key(run):
    """Runs in one leaderboard row share decoder family, parameters, code fingerprint and (text) scorer LM."""
    return run.family_key, json.dumps(run.params, sort_keys=True, default=str), run.fingerprint, run.scorer_lm


def row_sort(run):
    return run.family_sort + (sort_value(run.rep), json.dumps(run.params, default=str), str(run.fingerprint))


def row_name(run):
    """The decoder family's label (`name_families`): its name, and for a version of the editable
    decoder or a plugin its code hash and date; a --cache mode."""
    return run.family


def run_caption(run):
    return f"{row_name(run)} {params_text(run.params)}" if run.params else row_name(run)


def point_text(run):
    """A Pareto point's label: the family without its date, and the run's settings."""
    return f"{run.family_name} {params_text(run.params)}" if run.params else run.family_name


def choose_runs(runs):
    """One cell per (row, label): per seed the run with the most samples, then the newest, and over
    several seeds their mean (`merge_seeds`); also how many runs each cell had."""
    by_seed, counts = {}, {}
    for run in runs:
        k = (row_key(run), run.label)
        counts[k] = counts.get(k, 0) + 1
        seeds = by_seed.setdefault(k, {})
        seed = run.cfg.get("seed")
        if seed not in seeds or (run.n, run.mtime) > (seeds[seed].n, seeds[seed].mtime):
            seeds[seed] = run
    cells = {k: merge_seeds(list(seeds.values())) for k, seeds in by_seed.items()}
    rows = {}
    for (rk, label), run in cells.items():
        if rk not in rows or row_sort(run) < row_sort(rows[rk]):
            rows[rk] = run
    return cells, counts, rows


def merge_seeds(runs):
    """A cell from the runs of one configuration over seeds: one run as it is; over several, score,
    avg_steps, metrics and TPS are means, score_std is the sample standard deviation of the score
    and `source` the newest run, whose trace the figures and report.html show."""
    newest = max(runs, key=lambda r: r.mtime)
    if len(runs) == 1:
        return newest
    steps = float(np.mean([r.avg_steps for r in runs]))
    scores = [r.score for r in runs if r.score is not None]
    metrics = {m: float(np.mean([r.metrics[m] for r in runs])) for m in newest.metrics
               if all(m in r.metrics for r in runs)}
    order = {k: float(np.mean([r.order[k] for r in runs])) for k in newest.order
             if all(isinstance(r.order.get(k), (int, float)) for r in runs)}
    return dataclasses.replace(
        newest, score=float(np.mean(scores)) if scores else None, metrics=metrics, order=order,
        score_std=float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0, avg_steps=steps,
        tokens_per_forward=newest.cfg["gen_length"] / steps, pb_tps=float(np.mean([r.pb_tps for r in runs])),
        n=min(r.n for r in runs), n_seeds=len(runs), source=newest,
        seconds=float(np.mean([r.seconds for r in runs])) if all(r.seconds for r in runs) else None)


# ---------------------------------------------------------------------------
# Pareto fronts, PBx and AUP


class ParetoPoint(NamedTuple):
    """One configuration on a Pareto plot: avg_steps, score (%) ± its std over seeds, the family it
    is drawn in and the text it is annotated with."""
    steps: float
    score: float
    family: str
    text: str
    score_std: float = 0.0


def dominates(q, p):
    """q has no more steps than p and q's score minus its std is at least p's score plus its std,
    so points within each other's error bars never dominate each other (with std 0 the plain rule)."""
    return q.steps <= p.steps and q.score - q.score_std >= p.score + p.score_std


def pareto_front(points):
    """The points that no point before them (by steps ascending, then score descending) dominates,
    in that order: a tie of steps and score goes to the first."""
    ordered = sorted(points, key=lambda p: (p.steps, -p.score))
    return [p for i, p in enumerate(ordered) if not any(dominates(q, p) for q in ordered[:i])]


def pb_scores(configs, interpolate=False):
    """ParallelBench PBx (pb_score.compute_pb_scores): configs are (score 0-100, TPS); the largest TPS
    whose score is >= x. With `interpolate` (its rule for threshold, factor and adaptive methods, used
    when no top-k configuration is among them): the best score per TPS, by TPS, and TPS linearly
    interpolated at the rightmost crossing of x (the largest TPS itself when it reaches x)."""
    if not interpolate:
        return {x: max((tps for score, tps in configs if score >= x), default=None) for x in PB_LEVELS}
    best = {}
    for score, tps in configs:
        best[tps] = max(score, best.get(tps, -math.inf))
    points = sorted(best.items())
    return {x: interpolated_tps(points, x) for x in PB_LEVELS}


def interpolated_tps(points, x):
    """TPS where the (TPS, score) polyline, sorted by TPS, last crosses score x from above."""
    if points and points[-1][1] >= x:
        return points[-1][0]
    for (t0, s0), (t1, s1) in reversed(list(zip(points, points[1:]))):
        if s0 >= x > s1:
            return t0 + (s0 - x) * (t1 - t0) / (s0 - s1)
    return None


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


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def family_colors(n):
    """n distinct colours: tab10 up to 10 families, tab20 up to 20, else evenly spaced on turbo."""
    plt = pyplot()
    if n <= 10:
        return [plt.cm.tab10(i) for i in range(n)]
    if n <= 20:
        return [plt.cm.tab20(i) for i in range(n)]
    return [plt.cm.turbo(i / (n - 1)) for i in range(n)]


def plot_pareto(points, title, ylabel, path, xlabel="avg_steps (forwards per sample, log scale)"):
    """points: a ParetoPoint per configuration, families in the order of their first point; one
    colour per family, error bars ± std, every point labelled with its text (front points in black,
    the others smaller in grey). Returns the legend's labels."""
    plt = pyplot()
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(7, 4.6))
    families = list(dict.fromkeys(p.family for p in points))
    for i, (fam, color) in enumerate(zip(families, family_colors(len(families)))):
        mine = [p for p in points if p.family == fam]
        ax.scatter([p.steps for p in mine], [p.score for p in mine], s=26, label=fam, color=color,
                   marker="os^Dv<>P"[i // 10 % 7] if len(families) <= 20 else "os^Dv<>P"[i % 8])
        spread = [p for p in mine if p.score_std > 0]
        if spread:
            ax.errorbar([p.steps for p in spread], [p.score for p in spread], yerr=[p.score_std for p in spread],
                        fmt="none", ecolor=color, elinewidth=1, capsize=2)
    front = pareto_front(points)
    ax.plot([p.steps for p in front], [p.score for p in front], "k--", lw=1, label="Pareto front")
    ax.scatter([p.steps for p in front], [p.score for p in front], s=110, facecolors="none", edgecolors="k")
    ax.set_xscale("log")
    ticks = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(ticks)
    ax.xaxis.set_minor_formatter(ticks)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    legend = ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    label_points(ax, points, front)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [t.get_text() for t in legend.get_texts()]


def label_points(ax, points, front):
    """Every point's text beside it, front points first in black, the others smaller in grey. A label
    takes the first offset (above right, then alternately below / higher / lower) where it overlaps
    no label placed before it (estimated boxes); near the right edge it sits left of its point."""
    scale, placed = ax.figure.dpi / 72, []
    (x0, x1), to_pixels = ax.get_xlim(), ax.transData.transform
    for p in sorted(points, key=lambda p: (p not in front, p.steps, -p.score)):
        on_front = p in front
        size = 6 if on_front else 5
        width, height = len(p.text) * size * 0.55 * scale, size * 1.25 * scale
        flip = x1 > x0 > 0 and p.steps > 0 and math.log(p.steps / x0) > 0.8 * math.log(x1 / x0)
        x, y = to_pixels((p.steps, p.score))
        dx = -4 if flip else 4
        for dy in (2, -9, 9, -16, 16, -23, 23, -30, 30):
            left, bottom = x + dx * scale - (width if flip else 0), y + dy * scale
            box = (left, bottom, left + width, bottom + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(p.text, (p.steps, p.score), textcoords="offset points", xytext=(dx, dy), fontsize=size,
                    ha="right" if flip else "left", va="bottom", color="black" if on_front else "0.45")


def plot_order(traces, title, path):
    """Left: the share of samples that wrote each generated position after each forward. Right:
    the tokens written per forward, over all forwards of all samples."""
    plt = pyplot()
    G, F = len(traces[0]["commit_step"]), max(1, max(t["forwards"] for t in traces))
    share = np.zeros((G, F))
    for t in traces:
        for i, f in enumerate(t["commit_step"]):
            if f >= 0:
                share[i, f] += 1.0 / len(traces)
    written = np.concatenate([np.asarray(trajectories.tokens_per_forward(t), dtype=int) for t in traces])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw=dict(width_ratios=[3, 2]))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = left.imshow(np.ma.masked_equal(share, 0), aspect="auto", cmap=cmap, interpolation="nearest", vmin=0,
                        vmax=1, extent=(-0.5, F - 0.5, G - 0.5, -0.5))
    fig.colorbar(image, ax=left, label="share of samples")
    left.set_xlabel("forward")
    left.set_ylabel("generated position")
    most = written.max(initial=0)
    right.hist(written, bins=np.arange(most + 2) - 0.5, weights=np.full(len(written), 1.0 / max(1, len(written))),
               color="tab:blue")
    right.set_xlim(-0.5, most + 0.5)
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("tokens written after one forward")
    right.set_ylabel("share of forwards")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Report sections


def header_lines(results_dir, runs, problems, out_dir="."):
    shown = os.path.relpath(os.path.abspath(results_dir), out_dir)
    where = "this folder" if shown == "." else f"`{shown}`"
    lines = ["# Decoder report", "",
             f"{len(runs)} runs read from {where} (run directories and local model paths below are relative "
             "to it, or to the repository for models inside it). Rows never mix models, scorer LMs or decoder "
             "code (fingerprint): one section per model. A decoder family is one version of a decoder's code: "
             "it is named by its class's `name`, else its registry name, and the editable decoder (`default`) "
             "and plugins without a `name` add `@` their code hash and the date of their first run. Per row and "
             "label the run with the most samples (then the newest) is shown; `runs` counts the runs merged "
             "into the row.", "", *HEADER_NOTES, ""]
    if problems:
        lines += ["Runs not shown (unreadable summary.json, or not re-derived from samples.jsonl): "
                  + "; ".join(f"`{p}`" for p in problems), ""]
    return lines


def leaderboard_lines(kind, labels, mine, cells, counts, rows):
    text = kind == "text"
    head = ["decoder", "type", "rep. param", "settings", "position score"] + (["scorer LM"] if text else [])
    for label in labels:
        metric = next((r.metric for r in mine if r.label == label), "score")
        shown = list(TEXT_METRICS) if text else [metric if metric != "accuracy" else "acc"]
        head += [f"{label} {m}" for m in shown] + [f"{label} {c}" for c in ("steps", "tok/step", "s/sample", "τ", "ρ",
                                                                                "n")]
    head.append("runs")
    lines = [f"### Leaderboard ({'text labels' if text else 'accuracy labels'})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    near = set() if text else {(rk, label) for label in labels for rk in near_best(label, rows, cells)}
    for rk, first in sorted(rows.items(), key=lambda kv: row_sort(kv[1])):
        rep = f"{first.rep_name}={fmt_param(first.rep)}" if first.rep_name else "—"
        cols = [row_name(first), first.type, rep, params_text(first.params, skip=first.rep_name),
                fmt_param(run_position_score(first))] + ([str(first.scorer_lm)] if text else [])
        for label in labels:
            cols += label_cells(cells.get((rk, label)), text, near=(rk, label) in near)
        cols.append(str(sum(counts.get((rk, label), 0) for label in labels)))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |")
    described = {r.family: r.summary for r in sorted(rows.values(), key=row_sort) if r.summary}
    if described:
        lines += ["", *(f"- `{fam}`: {text}" for fam, text in described.items())]
    return lines + [""]


def near_best(label, rows, cells):
    """The rows of an accuracy label whose score is not significantly different from the best row's
    (the highest score, the first in row order on a tie): the 95 % paired bootstrap interval of the
    row's per-item verdicts minus the best row's holds 0 (compare.interval_holds_zero). Only cells of
    one run (not merged seeds) with records on the same sample ids as a best cell of one run."""
    scored = [(rk, cells[(rk, label)]) for rk in sorted(rows, key=lambda rk: row_sort(rows[rk]))
              if (rk, label) in cells and cells[(rk, label)].score is not None]
    if not scored:
        return set()
    best_rk, best = max(scored, key=lambda kv: kv[1].score)  # max keeps the first of equal scores
    if best.n_seeds > 1 or not best.items:
        return set()
    ids = sorted(best.items)
    base = np.array([best.items[i] for i in ids])
    return {rk for rk, run in scored if rk != best_rk and run.n_seeds == 1 and run.items.keys() == best.items.keys()
            and compare.interval_holds_zero(base, np.array([run.items[i] for i in ids]))}


def label_cells(run, text, near=False):
    if run is None:
        return ["—"] * ((len(TEXT_METRICS) if text else 1) + 6)
    if text:
        values = [run.metrics.get(m) for m in TEXT_METRICS]
        values = [fmt(None if v is None else (100 * v if m == "mauve" else float(v)), 2 if m != "rep2" else 3)
                  for m, v in zip(TEXT_METRICS, values)]
    else:
        values = [score_text(run.score, run.score_std) + (" ≈" if near else "")]
    order = [fmt(run.order.get(k), 2) for k in ("kendall_tau", "spearman_rho")]
    n = f"{run.n}×{run.n_seeds} seeds" if run.n_seeds > 1 else str(run.n)
    return values + [fmt(run.avg_steps), fmt(run.tokens_per_forward, 2), fmt(run.seconds, 3), *order, n]


def score_text(score, std):
    return fmt(score) + (f" ± {std:.1f}" if std else "")


def pareto_sections(kind, model, mine, runs, cells, out_dir, x_axis="steps"):
    lines = []
    for label, scorer_lm in sorted({(lab, r.scorer_lm) for (rk, lab), r in cells.items()},
                                   key=lambda t: (t[0], str(t[1]))):
        pts = [r for (rk, lab), r in cells.items() if lab == label and r.scorer_lm == scorer_lm
               and r.score is not None and r.avg_steps > 0]
        if pts:
            lines += pareto_section(label, scorer_lm, model, mine, runs, pts, out_dir, x_axis)
            if kind == "accuracy":
                lines += pbx_aup_lines(label, pts)
    return lines


def plot_name(label, scorer_lm, model, mine, runs):
    name = f"pareto_{slug(label)}"
    if len({r.model for r in runs if r.label == label}) > 1:
        name += f"_{slug(os.path.basename(model.rstrip('/')))}"
    if len({r.scorer_lm for r in mine if r.label == label}) > 1:
        name += f"_{slug(scorer_lm)}"
    return name + ".png"


X_AXES = {"steps": ("avg_steps", "steps", "avg_steps (forwards per sample, log scale)"),
          "seconds": ("seconds", "s/sample", "decoding seconds per sample (log scale)")}


def pareto_section(label, scorer_lm, model, mine, runs, pts, out_dir, x_axis="steps"):
    """The label's Pareto plot and front: the metric against avg_steps, or (x_axis "seconds") against
    the decoding seconds per sample, where runs without them are left out."""
    metric, short_model = pts[0].metric, os.path.basename(model.rstrip("/"))
    name = plot_name(label, scorer_lm, model, mine, runs)
    field_name, unit, xlabel = X_AXES[x_axis]
    pts = [r for r in pts if getattr(r, field_name)]
    if not pts:
        return [f"### {label}: no run records {unit}", ""]
    points = [ParetoPoint(getattr(r, field_name), r.score, r.family, point_text(r), r.score_std)
              for r in sorted(pts, key=row_sort)]
    scored = f", scorer {scorer_lm}" if scorer_lm else ""
    plot_pareto(points, f"{label} ({short_model}{scored}): {metric} vs {field_name}", f"{metric} (%)",
                os.path.join(out_dir, name), xlabel)
    front = pareto_front(points)
    return [f"### {label}{scored}: Pareto front ({metric} vs {field_name})", "", f"![{label}]({name})", "",
            "Front: " + "; ".join(f"{p.text} ({score_text(p.score, p.score_std)} @ {fmt(p.steps, 3 if x_axis == 'seconds' else 1)} {unit})"
                                  for p in front), ""]


def pbx_aup_lines(label, pts):
    y_max = max(r.score for r in pts)
    by_family = {}
    for r in sorted(pts, key=row_sort):
        by_family.setdefault(r.family_key, []).append(r)
    lines = [f"### {label}: PBx and AUP", "",
             "| decoder | configs | PB90 | PB80 | PB70 | PB60 | AUP |", "|---|---|---|---|---|---|---|"]
    for group in by_family.values():
        fam = group[0].family
        pb = pb_scores([(r.score, r.pb_tps) for r in group], interpolate=group[0].type != "topk")
        value, flagged = aup([(r.tokens_per_forward, r.score) for r in group], y_max)
        lines.append(f"| {fam} | {len(group)} | " + " | ".join(fmt(pb[x], 2) for x in PB_LEVELS) +
                     f" | {value:.2f}{'*' if flagged else ''} |")
    pb = pb_scores([(r.score, r.pb_tps) for r in pts], interpolate=all(r.type != "topk" for r in pts))
    return lines + [f"| all methods | {len(pts)} | " + " | ".join(fmt(pb[x], 2) for x in PB_LEVELS) + " | — |",
                    "", f"y_max = {y_max:.1f}.", ""]


def all_labels_pbx_lines(labels, rows, cells):
    """PBx over the mean score and TPS of the configurations run on every accuracy label."""
    complete = [rk for rk in rows if all((rk, label) in cells for label in labels)]
    configs = [(float(np.mean([cells[(rk, lab)].score for lab in labels])),
                float(np.mean([cells[(rk, lab)].pb_tps for lab in labels]))) for rk in complete]
    if len(labels) < 2 or not configs:
        return []
    pb = pb_scores(configs)
    return [f"### All accuracy labels ({', '.join(labels)}): PBx", "",
            f"Mean over labels of score and TPS, for the {len(configs)} configurations run on every label.", "",
            "| PB90 | PB80 | PB70 | PB60 |", "|---|---|---|---|",
            "| " + " | ".join(fmt(pb[x], 2) for x in PB_LEVELS) + " |", ""]


def order_lines(kind, cells, out_dir):
    """The order figure of every shown run that has a trace (its name is kept as the run's order_png)."""
    traced = []
    for run in sorted(cells.values(), key=lambda r: (r.label, row_sort(r))):
        traces = [r["trace"] for r in run.traced_records]
        if traces:
            run.shown.order_png = f"order_{slug(run.dir)}.png"
            title = f"{run.label}: {run_caption(run).replace('`', '')} ({len(traces)} samples)"
            plot_order(traces, title, os.path.join(out_dir, run.shown.order_png))
            traced.append(run)
    if not traced:
        return []
    lines = [f"### Decoding order ({'text labels' if kind == 'text' else 'accuracy labels'})", "",
             "Per run: the share of samples that wrote each generated position after each forward, and "
             "the tokens written per forward (re-commits of remasking decoders included); undone = tokens "
             "a remasking decoder re-masked or overwrote.", "",
             "| label | decoder | settings | τ | ρ | tokens / forward | undone / sample | figure |",
             "|---|---|---|---|---|---|---|---|"]
    for run in traced:
        o, png = run.order, run.shown.order_png
        lines.append(f"| {run.label} | {row_name(run)} | {params_text(run.params)} | "
                     f"{fmt(o.get('kendall_tau'), 2)} | {fmt(o.get('spearman_rho'), 2)} | "
                     f"{fmt(o.get('tokens_per_forward'), 2)} | {fmt(o.get('undone_per_sample'), 2)} | [{png}]({png}) |")
    return lines + [""]


def model_lines(model, runs, out_dir, x_axis="steps"):
    mine = [r for r in runs if r.model == model]
    lines = [f"## Model `{model}`", ""]
    for kind in ("accuracy", "text"):
        labels = sorted({r.label for r in mine if r.kind == kind})
        if not labels:
            continue
        cells, counts, rows = choose_runs([r for r in mine if r.kind == kind])
        lines += leaderboard_lines(kind, labels, mine, cells, counts, rows)
        lines += pareto_sections(kind, model, mine, runs, cells, out_dir, x_axis)
        if kind == "accuracy":
            lines += all_labels_pbx_lines(labels, rows, cells)
            lines += pb_lines(model, cells, out_dir)
        lines += order_lines(kind, cells, out_dir)
    return lines



# ---------------------------------------------------------------------------
# ParallelBench tasks: per-task accuracy and tokens per forward, PBx over the tasks, a plot per task
#
# A configuration is a decoder family with its settings, `steps` written as ParallelBench's k =
# gen_length / steps, so one k is one configuration on 32-token lists and 64-token puzzles alike. Its
# value on a task comes from a `<model>-pb-<task>` run, or from a `<model>-pb` suite run's per-task
# accuracy (with the suite's tokens per forward). PBx follows ParallelBench's analysis
# (pb_score.compute_pb_scores, docs/parallelbench.md): per configuration the mean over tasks of the
# accuracy (%) and of TPS (k for top-k methods, else gen_length / forwards), for the configurations
# run on every task shown; PBx is the largest such mean TPS whose mean accuracy is >= x.


def run_tasks(run):
    """{task: accuracy %} of a ParallelBench run (a single-task run or a suite run); {} for others."""
    if run.cfg.get("task") != "pb" or run.score is None:
        return {}
    data = os.path.basename(str(run.cfg.get("data", "")).rstrip("/"))
    if data.endswith("_test.jsonl"):
        return {data[:-len("_test.jsonl")]: run.score}
    return {t: 100 * run.metrics[f"{t}_accuracy"] for t in parallelbench.TASKS if f"{t}_accuracy" in run.metrics}


def config_params(run):
    """The run's settings with steps written as k = gen_length / steps (top-k methods always; others when
    they changed steps), gen_length left out."""
    params = {k: v for k, v in run.params.items() if k not in ("steps", "gen_length")}
    if "steps" in run.params or run.type == "topk":
        params["k"] = round(run.cfg["gen_length"] / run.cfg["steps"], 3)
    return params


def task_values(cells):
    """{(family_key, params json): {task: (accuracy %, TPS)}} and each configuration's shown run, over
    the chosen cells of one model (a per-task run wins over a suite run for the same task)."""
    values, shown = {}, {}
    for run in sorted(cells.values(), key=lambda r: r.label.count("-pb-")):  # suites first, per-task runs win
        tasks = run_tasks(run)
        if not tasks:
            continue
        key = (run.family_key, json.dumps(config_params(run), sort_keys=True, default=str))
        shown.setdefault(key, run)
        for task, score in tasks.items():
            values.setdefault(key, {})[task] = (score, run.pb_tps)
    return values, shown


def mean_point(per_task, tasks):
    """(mean accuracy %, mean TPS) over `tasks`, None unless the configuration ran every one."""
    if not all(t in per_task for t in tasks):
        return None
    return (sum(per_task[t][0] for t in tasks) / len(tasks), sum(per_task[t][1] for t in tasks) / len(tasks))


def pb_lines(model, cells, out_dir):
    """The section for one model's accuracy cells (report.choose_runs); [] without ParallelBench runs."""
    values, shown = task_values(cells)
    if not values:
        return []
    tasks = [t for t in parallelbench.TASKS if any(t in v for v in values.values())]
    order = sorted(values, key=lambda k: (shown[k].family_sort, shown[k].pb_tps or 0, k[1]))
    lines = [f"### ParallelBench tasks ({os.path.basename(model.rstrip('/'))})", "",
             "Accuracy % (tokens per forward) per task; the mean over the tasks shown when a configuration ran "
             "them all. PBx as ParallelBench computes it (docs/parallelbench.md).", "",
             "| decoder | settings | " + " | ".join(tasks) + " | mean |",
             "|---|---|" + "---|" * (len(tasks) + 1)]
    for key in order:
        run, per_task = shown[key], values[key]
        cells_text = [f"{per_task[t][0]:.0f} ({per_task[t][1]:.2f})" if t in per_task else "—" for t in tasks]
        mean = mean_point(per_task, tasks)
        lines.append(f"| {run.family} | {params_text(config_params(run))} | " + " | ".join(cells_text)
                     + f" | {'—' if mean is None else f'{mean[0]:.1f} ({mean[1]:.2f})'} |")
    lines += ["", *pbx_lines(order, shown, values, tasks), *plot_lines(model, order, shown, values, tasks, out_dir)]
    return lines


def pbx_lines(order, shown, values, tasks):
    families, topk = {}, {}
    for key in order:
        point = mean_point(values[key], tasks)
        if point is not None:
            families.setdefault(shown[key].family, []).append(point)
            topk[shown[key].family] = shown[key].type == "topk"
    if not families:
        return ["No configuration ran every task shown: no PBx.", ""]
    every = [p for points in families.values() for p in points]
    topk["all methods"] = any(topk.values())
    lines = [f"PBx over {len(tasks)} task(s) (top-k: discrete; other methods interpolated):", "",
             "| decoder | configs | " + " | ".join(f"PB{x}" for x in PB_LEVELS) + " |", "|---|---|" + "---|" * len(PB_LEVELS)]
    for family, points in list(families.items()) + [("all methods", every)]:
        pb = pb_scores(points, interpolate=not topk[family])
        lines.append(f"| {family} | {len(points)} | " + " | ".join(fmt(pb[x], 2) for x in PB_LEVELS) + " |")
    return lines + [""]


def plot_lines(model, order, shown, values, tasks, out_dir):
    """One figure per task: accuracy against tokens per forward, a line per decoder family."""
    plt = pyplot()
    families = list(dict.fromkeys(shown[k].family for k in order))
    colors = dict(zip(families, family_colors(len(families))))
    lines = []
    for task in tasks:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for family in families:
            points = sorted(values[k][task][::-1] for k in order if shown[k].family == family and task in values[k])
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=4, lw=1, color=colors[family],
                        label=family)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per forward (log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 103)
        ax.set_title(f"{task} ({os.path.basename(model.rstrip('/'))})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        name = f"pb_{slug(os.path.basename(model.rstrip('/')))}_{task}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        lines.append(f"![{task}]({name})")
    return lines + [""]


def csv_rows(model, mine):
    return [dict(model=model, label=r.label, decoder=r.decoder, method_type=r.type, rep_param=r.rep_name,
                 rep_value=r.rep, params=json.dumps(r.params, default=str), scorer_lm=r.scorer_lm, metric=r.metric,
                 score=r.score, avg_steps=r.avg_steps, tokens_per_step=r.tokens_per_forward, tps=r.pb_tps,
                 seconds_per_sample=r.seconds,
                 n_samples=r.n, kendall_tau=r.order.get("kendall_tau"), spearman_rho=r.order.get("spearman_rho"),
                 run_dir=r.dir, fingerprint=r.fingerprint, cache=r.cfg.get("cache", "none"), family=r.family,
                 version=r.version)
            for r in sorted(mine, key=lambda r: (r.label, row_sort(r), r.dir))]


def write_report(results_dir, out, label_defaults, run_keys, x_axis="steps"):
    """report.md (+ report.csv, pareto_<label>.png, order_<run>.png and report.html) for every
    summary.json under results_dir. label_defaults: {label: its settings}, to tell which settings
    a run changed."""
    runs, problems = collect_runs(results_dir, label_defaults, run_keys)
    if not runs:
        raise ValueError(f"no run with a readable summary.json and samples.jsonl under {results_dir!r}"
                         + (f" ({len(problems)} not shown, e.g. {problems[0]})" if problems else ""))
    out = out or os.path.join(results_dir, "report.md")
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    lines, rows = header_lines(results_dir, runs, problems, out_dir), []
    for model in sorted({r.model for r in runs}):
        lines += model_lines(model, runs, out_dir, x_axis)
        rows += csv_rows(model, [r for r in runs if r.model == model])
    with open(out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    with open(os.path.splitext(out)[0] + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report_html.write_html(os.path.splitext(out)[0] + ".html", lines, replay_views(runs))
    return out, len(runs)


def replay_views(runs):
    """What report.html shows of each run with an order figure (the shown runs with a trace)."""
    return [dict(label=r.label, caption=run_caption(r), model=r.model, model_path=r.model_path, figure=r.order_png,
                 order=r.order, records=r.traced_records)
            for r in sorted(runs, key=lambda r: (r.label, row_sort(r))) if r.order_png]
