#!/usr/bin/env python
"""Write the ParallelBench task files data/pb/<task>_{test,train}.jsonl (and the name list).

  python scripts/make_pb_data.py                    # data/pb/<task>_test.jsonl and _train.jsonl
  python scripts/make_pb_data.py --out DIR          # the same files under DIR (tests compare bytes)
  python scripts/make_pb_data.py --names-from DIR   # rebuild data/pb/names.json from the 1990 US
                                                    # Census files dist.male.first, dist.female.first
                                                    # and dist.all.last in DIR (data/SOURCES.md)

Rows come from demask.parallelbench: test = test_rows(task) (100 per task), train =
train_rows(task, TRAIN_SIZE) with the fixed TRAIN_SEED; no train question equals a test question.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demask import REPO, parallelbench as pb  # noqa: E402

OUT = os.path.join(REPO, "data", "pb")
TRAIN_SIZE = 200  # a sample of the split; train_rows(task, n) makes as many as a training run wants
FIRST_PER_SEX = 46
LAST_NAMES = 190


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_task(task, out):
    test = pb.test_rows(task)
    train = pb.train_rows(task, TRAIN_SIZE)
    test_questions = {row["messages"][-1]["content"] for row in test}
    assert not test_questions & {row["messages"][-1]["content"] for row in train}, task
    write_jsonl(os.path.join(out, f"{task}_test.jsonl"), test)
    write_jsonl(os.path.join(out, f"{task}_train.jsonl"), train)
    print(f"{task}: {len(test)} test, {len(train)} train rows")


def census_names(path, count):
    """The first `count` alphabetic names of a Census rank file, title-cased (MCDONALD → McDonald)."""
    names = []
    with open(path, encoding="ascii") as f:
        for line in f:
            name = line.split()[0]
            if name.isalpha():
                name = name.capitalize()
                if name.startswith("Mc") and len(name) > 2:
                    name = "Mc" + name[2:].capitalize()
                names.append(name)
            if len(names) == count:
                return names
    raise ValueError(f"{path} has fewer than {count} names")


def write_names(census_dir):
    male = census_names(os.path.join(census_dir, "dist.male.first"), FIRST_PER_SEX)
    female = census_names(os.path.join(census_dir, "dist.female.first"), FIRST_PER_SEX)
    first = list(dict.fromkeys(name for pair in zip(male, female) for name in pair))
    last = census_names(os.path.join(census_dir, "dist.all.last"), LAST_NAMES)
    os.makedirs(OUT, exist_ok=True)
    with open(pb.NAMES_FILE, "w", encoding="utf-8") as f:
        json.dump({"first": first, "last": last}, f, indent=0)
        f.write("\n")
    print(f"{pb.NAMES_FILE}: {len(first)} first names, {len(last)} last names")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help="folder for the task files (default data/pb)")
    parser.add_argument("--names-from", help="folder with the Census name files; rebuilds names.json")
    parser.add_argument("--tasks", nargs="+", default=list(pb.TASKS), choices=pb.TASKS)
    args = parser.parse_args()
    if args.names_from:
        write_names(args.names_from)
        return
    os.makedirs(args.out, exist_ok=True)
    for task in args.tasks:
        write_task(task, args.out)


if __name__ == "__main__":
    main()
