"""Evaluate the checkpoints of a policy training run through the normal CLI and aggregate them.

    python scripts/eval_policy.py RUN_DIR --checkpoints last --labels tiny-math \
        --policy_temperatures 1.0 --seeds 42,43,44 --out policy_eval.csv -- --block_length 64

Every checkpoint x label x policy temperature runs `custom_demask_eval.main` with
`--decoder policy --seeds ...` (arguments after `--` are passed on); the CSV has one line per
combination and metric: mean, std (sample, over seeds), min, max, n, from seeds_summary.json.
"""
import argparse
import csv
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import custom_demask_eval as cde  # noqa: E402


def checkpoints(run_dir, which):
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    if which == "first":
        return found[:1]
    if which == "last":
        return found[-1:]
    wanted = {int(n) for n in which.split(",")}
    return [p for p in found if int(p.rsplit("-", 1)[1]) in wanted]


def newest_seeds_summary(results_dir, label):
    paths = glob.glob(os.path.join(results_dir, label, "policy-*-seeds", "seeds_summary.json"))
    return json.load(open(max(paths, key=os.path.getmtime)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--checkpoints", default="last", help="first, last or N,M,...")
    p.add_argument("--labels", default="tiny-math")
    p.add_argument("--policy_temperatures", default="1.0")
    p.add_argument("--sampling_mode", default="bernoulli-argmax")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--results_dir", default=os.path.join(cde.REPO, "results"))
    p.add_argument("--out", default="policy_eval.csv")
    args = p.parse_args(argv)
    rows = []
    for folder in checkpoints(args.run_dir, args.checkpoints):
        for label in args.labels.split(","):
            for temperature in args.policy_temperatures.split(","):
                decoder_args = (f"policy_path={os.path.abspath(folder)},sampling_mode={args.sampling_mode},"
                                f"policy_temperature={temperature}")
                cde.main(["--label", label, "--decoder", "policy", "--decoder_args", decoder_args, "--seeds", args.seeds,
                          "--results_dir", args.results_dir, *passed])
                summary = newest_seeds_summary(args.results_dir, label)
                for metric, stats in summary["metrics"].items():
                    rows.append(dict(checkpoint=os.path.basename(folder), label=label, policy_temperature=temperature,
                                     metric=metric, **{k: stats[k] for k in ("mean", "std", "min", "max", "n")}))
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out} ({len(rows)} lines)")


if __name__ == "__main__":
    main()
