"""A run directory's sample files: read strictly, rewritten atomically, merged across processes.

samples.jsonl holds one JSON record per finished sample (samples.rank<r>.jsonl per process under
torchrun); a record's `id` must belong to the run's sample set and appear once.
"""
import json
import os
import sys

from .tasks import InputError


def parse_samples_file(path, wanted):
    """Records of a samples file. A line cut off by a crash (the last one, without newline) is
    dropped with a warning; any other line that is not a record, a record whose id is not in
    `wanted` and a repeated id are InputErrors naming the lines."""
    records, where = [], {}
    with open(path) as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("id"), str) and "steps" in record
        except json.JSONDecodeError:
            ok = False
        if not ok and n == len(lines) and not line.endswith("\n"):
            print(f"warning: {path}:{n}: dropped a line cut off by a crash", file=sys.stderr)
            break
        if not ok:
            raise InputError(f"{path}:{n}: not a sample record")
        if record["id"] not in wanted:
            raise InputError(f"{path}:{n}: sample id {record['id']!r} is not in this run's sample set")
        if record["id"] in where:
            raise InputError(f"{path}: sample id {record['id']!r} appears twice ({where[record['id']]} and {path}:{n})")
        where[record["id"]] = f"{path}:{n}"
        records.append(record)
    return records


def read_records(run_dir, wanted, origin=None):
    """Finished samples of a run from all its samples files (one per process), each id once;
    `origin`, a dict, gets each id's file."""
    records, seen = [], set()
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("samples") and name.endswith(".jsonl"):
            for r in parse_samples_file(os.path.join(run_dir, name), wanted):
                if r["id"] in seen:
                    raise InputError(f"{run_dir}: sample id {r['id']!r} is in two samples files")
                seen.add(r["id"])
                records.append(r)
                if origin is not None:
                    origin[r["id"]] = os.path.join(run_dir, name)
    return records


def json_line(record):
    return json.dumps(record, separators=(",", ":")) + "\n"  # compact: records carry integer arrays (trace)


def rewrite(path, records):
    """Write records as JSON Lines atomically."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json_line(r) for r in records)
    os.replace(path + ".tmp", path)


def merge_samples(run_dir, wanted):
    """One samples.jsonl from all per-process files (written atomically, then the parts removed)."""
    records = read_records(run_dir, wanted)
    rewrite(os.path.join(run_dir, "samples.jsonl"), records)
    for name in os.listdir(run_dir):
        if name.startswith("samples.rank"):
            os.remove(os.path.join(run_dir, name))
    return records
