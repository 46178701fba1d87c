#!/usr/bin/env python
"""Score predictions with ParallelBench's own scorer and write them as a parity fixture.

  python scripts/pb_upstream_scores.py --upstream DIR [--out tests/fixtures/pb_upstream_scores.jsonl]
  python scripts/pb_upstream_scores.py --upstream DIR --upstream-rows --out /tmp/x.jsonl

DIR is a checkout of furiosa-ai/ParallelBench (its `dataset/` and `utils/` folders suffice); the
script imports its `dataset.parallel_bench.ParallelBench` and calls its `compute_metrics(...,
output_per_sample=True)` once per prediction, recording `score` and `score_strict`. Nothing of
upstream is copied. The predictions are perturbations (PERTURBATIONS below) of the targets of
rows 0, 30, 60 and 90 of each of our test files (lengths 3–6), or, with --upstream-rows, of
upstream's own test rows (not committed). tests/test_parallelbench.py checks that
demask.parallelbench.score gives the same values on every record.
"""
import argparse
import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demask import REPO, parallelbench as pb  # noqa: E402

OUT = os.path.join(REPO, "tests", "fixtures", "pb_upstream_scores.jsonl")
ROW_PICKS = (0, 30, 60, 90)
UPSTREAM_COMMIT = "72de8f73246ae5b7c742c7eeae9a9853a90084ac"


def quoted(items):
    return pb.quoted_list(items)


def list_variants(given, out, answer):
    """Generations for a list task: formats around the target and edits of its contents."""
    t = quoted(out)
    variants = {
        "target": t, "prefix_text": "The final list is: " + t, "suffix_text": t + "\nThese are the people.",
        "trailing_bracket": t + " [done]", "leading_bracket": "[note] " + t,
        "no_quotes": "[" + ", ".join(out) + "]", "single_quotes": "[" + ", ".join(f"'{x}'" for x in out) + "]",
        "no_space_after_comma": "[" + ",".join(f'"{x}"' for x in out) + "]",
        "missing_quote": t.replace('"]', "]", 1), "no_brackets": t[1:-1], "no_closing_bracket": t[:-1],
        "no_opening_bracket": t[1:], "code_fence": "```\n" + t + "\n```", "newlines": "[\n" + ",\n".join(
            f'"{x}"' for x in out) + "\n]", "empty_list": "[]", "empty_text": "", "padded_item": t.replace('"', '" ', 1),
        "lowercase": t.lower(), "input_list": quoted(given), "swapped": quoted(out[1:2] + out[:1] + out[2:]),
        "reversed": quoted(out[::-1]), "duplicate_last": quoted(out + out[-1:]), "missing_last": quoted(out[:-1]),
        "duplicate_first_for_last": quoted(out[:-1] + out[:1]), "two_lists": quoted(given) + "\n" + t,
        "two_lists_reversed": t + "\n" + quoted(given), "empty_item": quoted(out[:1] + [""] + out[1:]),
        "quote_only_item": t.replace('"' + out[0] + '"', '"', 1), "inner_quote": t.replace(out[0], out[0] + '"x', 1),
        "eot_suffix": t + "<|eot_id|>",
    }
    word = answer.get("word") if isinstance(answer, dict) else None
    if word is not None:
        variants["word_first"] = quoted([word] + given)
        variants["word_last"] = quoted(given + [word])
        variants["word_twice"] = quoted([word] + given + [word])
        variants["word_missing"] = quoted(given)
        variants["word_replaces_first"] = quoted([word] + given[1:])
        variants["word_replaces_last"] = quoted(given[:-1] + [word])
        variants["word_replaces_two"] = quoted([word, word] + given[2:])
        variants["word_and_other_changed"] = quoted([word] + given[1:-1] + [given[0]])
    variants["drop_first"] = quoted(given[1:])
    variants["drop_last"] = quoted(given[:-1])
    variants["drop_two"] = quoted(given[1:-1])
    variants["drop_first_swap_rest"] = quoted(given[:0:-1])
    variants["rotated"] = quoted(given[1:] + given[:1])
    variants["sorted"] = quoted(sorted(given))
    return variants


def sudoku_variants(row):
    solution = row["answer"]
    rows = solution.split("\n")
    digits = [[int(c) for c in r] for r in rows]
    other = next(g for g in pb.sudoku_grids() if pb.grid_text([g[i:i + 4] for i in range(0, 16, 4)]) != solution)
    wrong = [r[:] for r in digits]
    wrong[0][0] = wrong[0][0] % 4 + 1
    return {
        "target": solution, "spaces": "\n".join(" ".join(r) for r in rows),
        "commas": "\n".join(",".join(r) for r in rows), "code_fence": "```\n" + solution + "\n```",
        "output_label": "Output:\n" + solution, "echo_input": row["puzzle"] + "\n" + solution,
        "other_valid_grid": pb.grid_text([other[i:i + 4] for i in range(0, 16, 4)]),
        "one_cell_wrong": pb.grid_text(wrong), "trailing_text": solution + "\nDone.",
        "fifth_digit": "\n".join(r + "1" for r in rows), "one_line": solution.replace("\n", ""),
        "bracketed_rows": "\n".join("[" + ", ".join(r) + "]" for r in rows),
        "three_rows": "\n".join(rows[:3]), "blank_lines": "\n\n".join(rows), "indented": "\n".join("  " + r for r in rows),
        "puzzle_only": row["puzzle"], "rows_swapped": "\n".join(rows[1:2] + rows[:1] + rows[2:]),
        "digits_with_words": "\n".join(f"row {i}: {r}" for i, r in enumerate(rows)),
        "eot_suffix": solution + "<|eot_id|>", "empty_text": "",
    }


def latin_variants(row):
    square = row["answer"]["example"]
    lines = square.split("\n")
    cells = [line.split(",") for line in lines]
    symbols = row["answer"]["symbols"]
    dup_row = cells[:1] + cells[:1] + cells[2:]
    return {
        "target": square, "spaces": "\n".join(", ".join(r) for r in cells),
        "header": ",".join(symbols) + "\n" + square, "code_fence": "```\n" + square + "\n```",
        "code_fence_csv": "```csv\n" + square + "\n```", "rows_swapped": "\n".join(lines[1:2] + lines[:1] + lines[2:]),
        "transposed": "\n".join(",".join(col) for col in zip(*cells)), "repeated_row": "\n".join(",".join(r) for r in dup_row),
        "extra_cell": "\n".join(line + "," + line[0] for line in lines), "three_rows": "\n".join(lines[:3]),
        "brackets": "\n".join("[" + line + "]" for line in lines), "pipes": "\n".join(line.replace(",", " | ") for line in lines),
        "semicolons": square.replace(",", ";"), "lowercase": square.lower(), "trailing_text": square + "\nThis is a Latin square.",
        "leading_text": "Here is the square:\n" + square, "blank_lines": square.replace("\n", "\n\n"),
        "five_rows": square + "\n" + lines[0], "symbol_list_row": "[" + ", ".join(symbols) + "]\n" + square,
        "one_line": square.replace("\n", ","), "empty_text": "", "eot_suffix": square + "<|eot_id|>",
    }


def variants(row):
    if row["task"] == "sudoku":
        return sudoku_variants(row)
    if row["task"] == "latin_square":
        return latin_variants(row)
    given = row["list"]
    answer = row["answer"]
    out = pb.parse_list(answer if isinstance(answer, str) else answer["example"])
    return list_variants(given, out, answer)


def our_rows():
    for task in pb.TASKS:
        rows = pb.test_rows(task)
        for i in ROW_PICKS:
            if i < len(rows):
                yield rows[i]


def upstream_rows(upstream):
    """Upstream's own test rows, as rows of ours (task, answer, list / puzzle fields)."""
    base = os.path.join(upstream, "dataset", "parallel_bench", "data", "output", "test")
    for task in pb.TASKS:
        name = pb.UPSTREAM_NAMES[task]
        with open(os.path.join(base, name + ".jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        for i in ROW_PICKS:
            rec = records[i]
            row = {"id": f"upstream:{name}/{i}", "task": task, "answer": rec["answer"]}
            if task in pb.WAITING_LINE:
                row["list"] = pb.parse_list(rec["input"]["context"])
            elif task == "sudoku":
                row["puzzle"] = rec["input"]["sudoku"]
            yield row


def upstream_scorer(upstream):
    sys.path.insert(0, upstream)
    # upstream's utils/ has no __init__.py, so our utils.py would shadow it
    sys.modules["utils"] = types.ModuleType("utils")
    sys.modules["utils"].__path__ = [os.path.join(upstream, "utils")]
    from dataset.parallel_bench import ParallelBench
    cache = {}

    def scores(task, text, answer):
        if task not in cache:
            cache[task] = ParallelBench(pb.UPSTREAM_NAMES[task])
        _, per_sample = cache[task].compute_metrics([text], [answer], output_per_sample=True)
        return per_sample[0]["score"], per_sample[0]["score_strict"]
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="ParallelBench checkout (dataset/, utils/)")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--commit", default=UPSTREAM_COMMIT, help="the checkout's commit, for the header")
    parser.add_argument("--upstream-rows", action="store_true", help="perturb upstream's test rows instead")
    args = parser.parse_args()
    scores = upstream_scorer(os.path.abspath(args.upstream))
    rows = upstream_rows(args.upstream) if args.upstream_rows else our_rows()
    records = []
    for row in rows:
        for case, text in variants(row).items():
            score, strict = scores(row["task"], text, row["answer"])
            records.append({"id": row["id"], "task": row["task"], "case": case, "answer": row["answer"],
                            "text": text, "score": score, "score_strict": float(strict)})
    header = {"source": "furiosa-ai/ParallelBench", "commit": args.commit,
              "scorer": "dataset/parallel_bench/__init__.py: ParallelBench.compute_metrics(output_per_sample=True) "
                        "with the metric functions of dataset/parallel_bench/metrics.py",
              "records": len(records)}
    with open(args.out, "w", encoding="utf-8") as f:
        for rec in [header] + records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"{args.out}: {len(records)} predictions scored by upstream @ {args.commit}")


if __name__ == "__main__":
    main()
