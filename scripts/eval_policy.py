"""Evaluate unmasking policies beside the reference decoders through the normal CLI, and check the
tiny-math bar of issue #13.

    python scripts/eval_policy.py POLICY [POLICY ...] [--checkpoints last] [--block_lengths 64,32] \
        [--policy_temperatures 1.0] [--seeds 42,43,44] [--out policy_eval.csv] [-- CLI flags, e.g. --limit 8]

A POLICY is a policy folder (model.safetensors + config.json) or a training run directory, whose
checkpoint-N folders --checkpoints picks (first, last or N,M,...). Per block length (a mode), one
sweep of the label (`custom_demask_eval.main --sweep ... --seeds ...`: one model load, finished
runs skipped) runs every policy x policy temperature and the reference decoders (--references, a
--sweep spec; default: threshold τ 0.5 ... 0.95, factor, eb_sampler and klass at their defaults).
The CSV has one line per mode, configuration and metric: mean, std (sample, over seeds), min, max,
n. Printed per mode: accuracy ± std and avg_steps ± std of every configuration, whether it is on
the Pareto front of all of them (report.pareto_front, which respects the error bars), and per
policy the bar's verdict against the references:
  fully parallel (block = gen_length): on the front of the references and strictly dominating one;
  semi-AR (block < gen_length): accuracy >= threshold τ 0.9's - 0.02 at no more avg_steps (means).
Runs go to RESULTS_DIR/<model>-<12 hex of the model weights' sha256>/, so a retrained model never
reuses the runs of the old one (a run's identity holds the model's path, not its weights).
"""
import argparse
import csv
import glob
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import custom_demask_eval as cde  # noqa: E402
from demask import report  # noqa: E402

REFERENCES = "threshold:alg_threshold=0.5,0.6,0.7,0.8,0.9,0.95;factor;eb_sampler;klass"
SEMI_AR_REFERENCE, SEMI_AR_SLACK = "threshold alg_threshold=0.9", 0.02


def checkpoints(path, which):
    """A policy folder as is; a run directory's checkpoint-N folders picked by `which`."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return [path]
    found = sorted(glob.glob(os.path.join(path, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    if which == "first":
        return found[:1]
    if which == "last":
        return found[-1:]
    wanted = {int(n) for n in which.split(",")}
    return [p for p in found if int(p.rsplit("-", 1)[1]) in wanted]


def results_dir(root, model_path):
    with open(os.path.join(model_path, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return os.path.join(root, f"{os.path.basename(os.path.normpath(model_path))}-{digest}")


def sweep_spec(args, folders):
    policies = [f"policy:policy_path={os.path.abspath(p)},sampling_mode={args.sampling_mode},"
                f"policy_temperature={args.policy_temperatures}" for p in folders]
    return ";".join(filter(None, [args.references, *policies]))


def config_name(decoder, overrides):
    if decoder == "policy":
        return f"policy {os.path.relpath(overrides['policy_path'])} T={overrides['policy_temperature']}"
    return " ".join([decoder, *(f"{k}={v}" for k, v in overrides.items())])


def evaluate_mode(args, spec, block_length, passed):
    """[(name, seed statistics)] of every configuration of `spec` at one block length."""
    stats = cde.main(["--label", args.label, "--model_path", args.model_path, "--sweep", spec, "--seeds", args.seeds,
                      "--block_length", str(block_length), "--results_dir", args.results, *passed])
    return [(config_name(*config), s) for config, s in zip(cde.parse_sweep(spec), stats)]


def point(name, stats):
    """The report's Pareto point of a configuration."""
    return report.ParetoPoint(stats["avg_steps"]["mean"], stats["accuracy"]["mean"], name.split()[0], name,
                              stats["accuracy"]["std"])


def bar_verdict(policy, references, fully_parallel):
    """(met, reason) of the issue-13 bar for one policy point against the references' points."""
    if fully_parallel:
        on_front = not any(report.dominates(q, policy) for q in references)
        beaten = [q.text for q in references if report.dominates(policy, q) and not report.dominates(q, policy)]
        return on_front and bool(beaten), (f"on the front: {'yes' if on_front else 'no'}; "
                                           f"strictly dominates: {', '.join(beaten) or 'none'}")
    expert = next((q for q in references if q.text == SEMI_AR_REFERENCE), None)
    if expert is None:
        return False, f"no {SEMI_AR_REFERENCE} among the references"
    met = policy.score >= expert.score - SEMI_AR_SLACK and policy.steps <= expert.steps
    return met, (f"accuracy {policy.score:.3f} vs {expert.score:.3f} (bar >= {expert.score - SEMI_AR_SLACK:.3f}), "
                 f"avg_steps {policy.steps:.2f} vs {expert.steps:.2f} (bar <=)")


def print_mode(block_length, gen_length, results):
    points = [point(name, stats) for name, stats in results]
    front = {p.text for p in report.pareto_front(points)}
    fully_parallel = block_length == gen_length
    print(f"\nblock {block_length} ({'fully parallel' if fully_parallel else 'semi-AR'}), "
          f"{int(results[0][1]['n_samples']['mean'])} problems:")
    for (name, stats), p in zip(results, points):
        steps = stats["avg_steps"]
        print(f"  {name:60s} {p.score:.3f} ± {p.score_std:.3f}  {steps['mean']:6.2f} ± {steps['std']:.2f}  "
              f"{'front' if name in front else ''}")
    references = [p for p in points if p.family != "policy"]
    for p in points:
        if p.family == "policy":
            met, reason = bar_verdict(p, references, fully_parallel)
            print(f"BAR block {block_length}: {p.text}: {'MET' if met else 'NOT MET'} ({reason})")


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["block_length", "configuration", "metric", "mean", "std", "min", "max",
                                               "n"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {path} ({len(rows)} lines)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("policies", nargs="+", help="policy folders or training run directories")
    p.add_argument("--checkpoints", default="last", help="of a run directory: first, last or N,M,...")
    p.add_argument("--label", default="tiny-math")
    p.add_argument("--model_path", help="default: the label's model")
    p.add_argument("--block_lengths", default="64,32")
    p.add_argument("--policy_temperatures", default="1.0")
    p.add_argument("--sampling_mode", default="bernoulli-argmax")
    p.add_argument("--references", default=REFERENCES, help="--sweep spec of the reference decoders ('' for none)")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--results_dir", default=os.path.join(cde.REPO, "results", "policy_eval"))
    p.add_argument("--out", default="policy_eval.csv")
    args = p.parse_args(argv)
    args.model_path = args.model_path or cde.LABELS[args.label].model
    args.results = results_dir(args.results_dir, args.model_path)
    found = {path: checkpoints(path, args.checkpoints) for path in args.policies}
    if not all(found.values()):
        p.error(f"no policy folder or checkpoint asked for in {', '.join(k for k, v in found.items() if not v)}")
    spec = sweep_spec(args, [folder for folders in found.values() for folder in folders])
    modes = {block_length: evaluate_mode(args, spec, block_length, passed)
             for block_length in map(int, args.block_lengths.split(","))}
    for block_length, results in modes.items():
        print_mode(block_length, cde.LABELS[args.label].gen_length, results)
    write_csv(args.out, [dict(block_length=block_length, configuration=name, metric=metric, **s)
                         for block_length, results in modes.items() for name, stats in results
                         for metric, s in stats.items()])


if __name__ == "__main__":
    main()
