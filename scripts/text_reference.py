"""The human row of a text label: its reference continuations scored like a decoder's.

    python scripts/text_reference.py                      # tiny-text, SmolLM2 scorer
    python scripts/text_reference.py --label dream-text   # the C4 label, its scorer (gpt2-large)

On the label's samples (its `limit`, e.g. the first 64 tiny-text records): gen_ppl of each reference
given its prefix, entropy and rep2 of the references, exactly as text_metrics scores a decoder's
continuations; MAUVE of these prefix + reference texts against the same number of other human
texts of the file (the next records), since MAUVE of a text set against itself is 1 by construction.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import custom_demask_eval as cde  # noqa: E402
from demask import tasks  # noqa: E402
from demask import textmetrics  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="tiny-text", choices=[k for k, v in cde.LABELS.items() if v.task == "text"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    cfg = cde.LABELS[args.label]
    rows = tasks.read_jsonl(os.path.join(cde.REPO, cfg.data), ("prefix", "reference"))
    n = cfg.limit or len(rows) // 2
    if len(rows) < 2 * n:
        raise SystemExit(f"{cfg.data}: {len(rows)} records, {2 * n} needed ({n} scored, {n} as the other human texts)")
    mine, others = rows[:n], rows[n:2 * n]
    scorer = textmetrics.load_scorer(cfg.scorer, args.device)
    P, R = [r["prefix"] for r in mine], [r["reference"] for r in mine]
    ids = [textmetrics.continuation_ids(pre, ref) for pre, ref in zip(P, R)]
    human = textmetrics.mauve_features(scorer, [r["prefix"] + r["reference"] for r in others])
    these = textmetrics.mauve_features(scorer, [pre + ref for pre, ref in zip(P, R)])
    mauve = textmetrics.mauve_stats(human, these)
    out = dict(label=args.label, n=n, scorer=scorer.name, gen_ppl=textmetrics.gen_ppl(scorer, P, R)["gen_ppl"],
               mauve=mauve["mauve"], mauve_std=mauve["mauve_std"],
               entropy=float(np.mean([textmetrics.bigram_entropy_bits(y) for y in ids])),
               rep2=float(np.mean([textmetrics.rep2(y) for y in ids])))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
