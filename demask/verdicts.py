"""Verdicts and metrics re-derived from a run's samples, never read back.

Its job: a run directory's files are plain text that anyone can edit, so nothing that counts is
taken from them as stored. samples.jsonl keeps each sample's `generation`, the verdict the harness
gave it (the fields the task's judge returns: extracted / correct for math, completion / correct /
result for code, reference / rep2 for text) and its counted forwards (`steps`); summary.json keeps
metrics computed from those records. Here:

- `check_records`: each record's `steps` is an int (not a bool, float or string) from 0 to the
  run's forward limit (`forward_limit`: the rule checker's budget, 4 x max(steps, gen_length)),
  `reported_steps` an int and `generation` a string; else an InputError naming the file and the
  sample id.
- `rejudge_records`: each record's verdict recomputed from its `generation` by the task's own
  judge (`task.judge(samples, texts)`, the samples of `task.load(run)` by id) and compared field by
  field (JSON values, types included) with what the record stores; a text record's `prompt` (what
  the scorer LM conditions on) must be its sample's prefix. A disagreement is an InputError naming
  the id and the field, or with correct=True the record is corrected and the corrections returned.
- `read_checked`: the records of a run directory (demask/records.py's strict reading), checked and
  re-judged; with rejudge=True the corrected records are rewritten in their files (atomically) and
  one line per corrected id goes to stderr.
- Metrics from checked records, two paths:
  `cheap_metrics`: task.metrics + avg_steps + n_samples, no model at all. Everything of math and
  code runs (accuracy / pass@1) and rep2 of text runs. Used by the report (demask/report.py), which
  has no scorer LM: there a text run's gen_ppl / MAUVE / entropy stay summary.json's and the
  report's header says they are not re-derived.
  `full_metrics`: task.final_metrics (text runs load the scorer LM) + avg_steps + n_samples, what
  summary.json holds. Used by the entry script's sweeps for a configuration found complete
  (`rederived_run_metrics`), so that printed metrics and seeds_summary.json come from samples.
- `metric_differences`: summary.json's metrics against re-derived ones (1e-9 tolerance: float
  formatting only).

Code verdicts are cached so that re-judging does not run every program again (`VerdictCache`):
sha256 of (the program judged: prompt + completion, the judge's stub of the prompt, the test, the
entry point, the timeout, the sandbox layer) -> (passed, result), one JSON file under
`textmetrics.demask_cache_dir()` (verdicts/code.json), written atomically. An entry is only ever
written after a real sandbox judgement (utils.check_code). What the cache is trusted with: it lives
on this machine, outside every results folder (the files that travel and get edited), so a results
folder cannot plant an entry; and an entry only ever confirms a record: a cached verdict that
equals the record's stored (correct, result) spares the sandbox run, any other program (no entry,
or an entry that disagrees with the record) runs in the sandbox, whose verdict decides and
replaces the entry. So a planted entry cannot change a verdict or make a correction; it could only
hide an edit of a record that says exactly what the entry says, which takes write access to this
machine's cache folder, as much as editing the harness's code.
"""
import hashlib
import inspect
import json
import os
import sys
from typing import NamedTuple

import numpy as np

import utils

from . import textmetrics
from .records import parse_samples_file, read_records, rewrite
from .tasks import CodeTask, InputError, TextTask

METRIC_TOLERANCE = 1e-9  # summary.json against re-derived metrics: float formatting only
CODE_TIMEOUT = inspect.signature(utils.check_code).parameters["timeout"].default  # what CodeTask.judge runs with


class Correction(NamedTuple):
    """One field of one record that its task's judge says otherwise."""
    id: str
    field: str
    stored: object
    judged: object


def forward_limit(run):
    """The most forwards a sample may count: the rule checker's budget (demask/core.py RuleChecker)."""
    return 4 * max(run.steps, run.gen_length)


def settings_from_config(cfg):
    """A RunSettings from a summary's or config.json's dict, ignoring keys this code does not know
    (runs of other versions of the harness)."""
    import dataclasses
    from .settings import RunSettings
    names = {f.name for f in dataclasses.fields(RunSettings)}
    return RunSettings.from_json({k: v for k, v in cfg.items() if k in names})


def short(value, width=60):
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def check_records(records, run, where):
    """Each record's steps an int in [0, forward_limit(run)], reported_steps (when present) an int,
    generation a string; else an InputError naming the file (`where`: path, or {id: path}) and the id."""
    limit = forward_limit(run)
    for r in records:
        at = where.get(r["id"], "") if isinstance(where, dict) else where
        steps = r.get("steps")
        if type(steps) is not int or not 0 <= steps <= limit:
            raise InputError(f"{at}: sample {r['id']!r}: steps {short(steps)} is not a count of forwards "
                             f"(an integer from 0 to {limit}, the run's forward limit 4 x max(steps, gen_length))")
        if "reported_steps" in r and type(r["reported_steps"]) is not int:
            raise InputError(f"{at}: sample {r['id']!r}: reported_steps {short(r['reported_steps'])} is not an integer")
        if not isinstance(r.get("generation"), str):
            raise InputError(f"{at}: sample {r['id']!r}: generation {short(r.get('generation'))} is not a string")
    return records


def same(stored, judged):
    """Equal as JSON values, types included (True is not 1, 1 is not 1.0)."""
    if type(stored) is not type(judged):
        return False
    if isinstance(judged, list):
        return len(stored) == len(judged) and all(same(a, b) for a, b in zip(stored, judged))
    if isinstance(judged, dict):
        return stored.keys() == judged.keys() and all(same(stored[k], judged[k]) for k in judged)
    return stored == judged


MISSING = object()


def rejudge_records(task, records, samples, where, correct=False, cache=None):
    """(records, corrections): each record's verdict as the task's judge gives its generation,
    compared field by field with the record. A disagreement is an InputError naming the file
    (`where`: path, or {id: path}), the id and the field; with correct=True the record is replaced
    by a corrected copy and each disagreeing field is a Correction. Code runs use `cache` (a
    VerdictCache; by default this machine's)."""
    if not records:
        return [], []
    by_id = {s["id"]: s for s in samples}
    foreign = [r["id"] for r in records if r["id"] not in by_id]
    if foreign:
        at = where.get(foreign[0], "") if isinstance(where, dict) else where
        raise InputError(f"{at}: sample id {foreign[0]!r} is not in this run's sample set")
    batch = [by_id[r["id"]] for r in records]
    texts = [r["generation"] for r in records]
    if isinstance(task, CodeTask):
        cache = cache or VerdictCache()
        claimed = {r["id"]: (r.get("correct"), r.get("result")) for r in records}
        judged = task.judge(batch, texts, check=cached_check(cache, claimed))
        cache.save()
    else:
        judged = task.judge(batch, texts)
    out, corrections = [], []
    for r, s, verdict in zip(records, batch, judged):
        verdict = json.loads(json.dumps(verdict))  # as a record stores it
        if isinstance(task, TextTask):
            verdict = dict(verdict, prompt=s["prefix"])
        wrong = [Correction(r["id"], k, r.get(k, MISSING), v) for k, v in verdict.items()
                 if not same(r.get(k, MISSING), v)]
        out.append(dict(r, **verdict) if wrong else r)
        corrections += wrong
    if corrections and not correct:
        c = corrections[0]
        at = where.get(c.id, "") if isinstance(where, dict) else where
        stored = "none" if c.stored is MISSING else short(c.stored)
        more = len({x.id for x in corrections}) - 1
        raise InputError(f"{at}: sample {c.id!r}: its stored {c.field} {stored} is not what the task's judge gives "
                         f"its generation ({short(c.judged)})" + (f"; {more} more sample(s) disagree" if more else "")
                         + " (--rejudge corrects the records)")
    return out, corrections


def read_checked(run_dir, run, task, samples, only=None, rejudge=False, cache=None):
    """The records of run_dir's samples files (records.read_records: valid lines, ids of `samples`,
    each once), those whose id is in `only` (default: all) checked (check_records) and re-judged
    (rejudge_records); returns those. With rejudge=True a disagreeing record is corrected in its
    file (records.rewrite, atomic) and one line per corrected id goes to stderr."""
    if not os.path.isdir(run_dir):
        return []
    wanted, origin = {s["id"] for s in samples}, {}
    records = [r for r in read_records(run_dir, wanted, origin) if only is None or r["id"] in only]
    check_records(records, run, origin)
    records, corrections = rejudge_records(task, records, samples, origin, correct=rejudge, cache=cache)
    if corrections:
        fixed = {r["id"]: r for r in records if r["id"] in {c.id for c in corrections}}
        for path in sorted({origin[i] for i in fixed}):
            rewrite(path, [fixed.get(r["id"], r) for r in parse_samples_file(path, wanted)])
        for i in fixed:
            changes = ", ".join(f"{c.field} {'none' if c.stored is MISSING else short(c.stored, 40)} -> "
                                f"{short(c.judged, 40)}" for c in corrections if c.id == i)
            print(f"rejudged: {origin[i]}: sample {i!r}: {changes}", file=sys.stderr)
    return records


# ---------------------------------------------------------------------------
# Metrics

def cheap_metrics(task, records):
    """What needs no model: task.metrics (accuracy / pass@1; rep2 of text runs), avg_steps, n_samples."""
    return dict(task.metrics(records), avg_steps=float(np.mean([r["steps"] for r in records])),
                n_samples=float(len(records)))


def full_metrics(task, records, run, device=None):
    """(metrics, details) as summary.json holds them: task.final_metrics (a text run loads its scorer
    LM on `device`; default cuda if available, else cpu), avg_steps, n_samples."""
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics, details = task.final_metrics(records, run, device)
    metrics["avg_steps"] = float(np.mean([r["steps"] for r in records]))
    metrics["n_samples"] = float(len(records))
    return metrics, details


def metric_differences(stored, derived, tolerance=METRIC_TOLERANCE):
    """The metrics of `derived` that `stored` (summary.json's) lacks or gives otherwise, as text."""
    out = []
    for name, value in derived.items():
        was = stored.get(name) if isinstance(stored, dict) else None
        number = isinstance(was, (int, float)) and not isinstance(was, bool)
        if not number or not abs(was - value) <= tolerance * max(1.0, abs(value)):
            out.append(f"{name} {short(was, 30)} in summary.json, {value:.6g} from samples.jsonl")
    return out


def rederived_run_metrics(run_dir, run, task, samples, device=None, rejudge=False):
    """The metrics of a run found complete (a sweep's configuration): its records checked and
    re-judged (read_checked), then full_metrics; summary.json's metrics are not used. Those of
    them that cheap_metrics re-derives and that differ are reported on stderr; with rejudge=True
    summary.json's metrics are replaced (atomically) by the re-derived ones."""
    records = read_checked(run_dir, run, task, samples, rejudge=rejudge)
    if len(records) != len(samples):
        raise InputError(f"{run_dir}: {len(records)} records for {len(samples)} samples")
    metrics, _ = full_metrics(task, records, run, device)
    path = os.path.join(run_dir, "summary.json")
    with open(path) as f:
        summary = json.load(f)
    differs = metric_differences(summary.get("metrics"), {k: metrics[k] for k in cheap_metrics(task, records)})
    if differs:
        print(f"warning: {path}: " + "; ".join(differs) + "; the re-derived metrics are used"
              + ("" if rejudge else " (--rejudge rewrites them)"), file=sys.stderr)
        if rejudge:
            summary["metrics"] = metrics
            with open(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(path + ".tmp", path)
    return metrics


# ---------------------------------------------------------------------------
# Code verdict cache

def code_key(problem, completion, timeout=CODE_TIMEOUT):
    """sha256 of what utils.check_code judges: program (prompt + completion), the judge's stub of
    the prompt, test, entry point, timeout, and the sandbox layer."""
    from . import sandbox
    text = json.dumps([problem["prompt"] + completion, utils._stub(problem), problem["test"],
                       problem["entry_point"], timeout, sandbox.layer()])
    return hashlib.sha256(text.encode()).hexdigest()


class VerdictCache:
    """Code verdicts by code_key: [passed, result], in <demask_cache_dir()>/verdicts/code.json.
    `put` is called only with a sandbox's verdict (cached_check); `save` merges the new entries into
    the file as it is now and replaces it atomically. An unreadable file counts as empty."""

    def __init__(self, path=None):
        self.path = path or os.path.join(textmetrics.demask_cache_dir(), "verdicts", "code.json")
        self.entries, self.added = self.read(), {}

    def read(self):
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items()
                if isinstance(v, list) and len(v) == 2 and type(v[0]) is bool and isinstance(v[1], str)}

    def get(self, key):
        entry = self.entries.get(key)
        return tuple(entry) if entry else None

    def put(self, key, passed, result):
        self.entries[key] = self.added[key] = [bool(passed), str(result)]

    def save(self):
        if not self.added:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            current = self.read()
            current.update(self.added)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(current, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.entries.update(current)
        except OSError as e:  # a cache that cannot be written only costs sandbox runs next time
            print(f"warning: code verdict cache {self.path} not written ({e})", file=sys.stderr)
        self.added = {}


def cached_check(cache, claimed, timeout=CODE_TIMEOUT):
    """A utils.check_code for CodeTask.judge: a program whose cached verdict equals the one its
    record claims ({id: (correct, result)}) is not run again; every other runs in the sandbox
    (utils.check_code), whose verdict is returned and cached."""
    def check(problems, completions):
        out, keys = {}, {}
        for i, completion in completions.items():
            key = code_key(problems[i], completion, timeout)
            hit = cache.get(key)
            if hit is not None and same(list(hit), list(claimed.get(i, (None, None)))):
                out[i] = dict(passed=hit[0], result=hit[1])
            else:
                keys[i] = key
        if keys:
            judged = utils.check_code({i: problems[i] for i in keys}, {i: completions[i] for i in keys},
                                      timeout=timeout)
            for i, key in keys.items():
                cache.put(key, judged[i]["passed"], judged[i]["result"])
                out[i] = judged[i]
        return out
    return check
