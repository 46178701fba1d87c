"""Digest of every registered decoder on the tiny labels, for checking that a refactor changes no number.

Runs one `--sweep` per label through the command line (one model load per label), then writes, per
label and decoder, the final lines and each sample's generation, counted forwards and verdict:
    python scripts/zoo_digest.py --out /tmp/before.json            # on the old code
    python scripts/zoo_digest.py --out /tmp/after.json             # on the new code
    cmp /tmp/before.json /tmp/after.json
It reads only the run directories and the printed lines, so it works across layouts of the code.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ("tiny-math", "tiny-code", "tiny-text")
RECORD_FIELDS = ("generation", "steps", "correct", "passed", "stopped")


def registered_decoders():
    code = ("import sys; sys.argv = ['x']; import custom_demask_eval as c; "
            "print(' '.join(sorted(c.DECODERS)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def sweep(label, decoders, results, limit):
    command = [sys.executable, os.path.join(REPO, "custom_demask_eval.py"), "--label", label,
               "--sweep", ";".join(decoders), "--results_dir", results]
    if limit:
        command += ["--limit", str(limit)]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{label}: exit {out.returncode}\n{out.stderr[-2000:]}")
    return [line for line in out.stdout.splitlines() if not line.startswith(("TRAIN_METRICS", "sweep:"))]


def runs_of(results, label):
    """decoder -> its records, from each run directory's config.json and samples.jsonl."""
    out = {}
    folder = os.path.join(results, label)
    for name in sorted(os.listdir(folder)):
        config = json.load(open(os.path.join(folder, name, "config.json")))
        records = [json.loads(line) for line in open(os.path.join(folder, name, "samples.jsonl"))]
        out[config["decoder"]] = {r["id"]: {k: r[k] for k in RECORD_FIELDS if k in r} for r in records}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--labels", default=",".join(LABELS))
    p.add_argument("--limit", type=int, help="only the first N samples of each label")
    args = p.parse_args()
    decoders = registered_decoders()
    digest = {}
    with tempfile.TemporaryDirectory() as results:
        for label in args.labels.split(","):
            lines = sweep(label, decoders, results, args.limit)
            digest[label] = dict(final_lines=lines, samples=runs_of(results, label))
            print(f"{label}: {len(digest[label]['samples'])} decoders", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(digest, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
