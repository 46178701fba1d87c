"""ParallelBench's waiting-line and puzzle tasks: deterministic data, chat messages and scoring.

ParallelBench (furiosa-ai/ParallelBench, arXiv 2510.04767) asks for list edits of 3–6 full names
("waiting line") and two 4×4 puzzles. This module generates such samples from seeds with our own
code and name list (data/pb/names.json), builds the chat messages upstream sends to LLaDA / Dream
(one in-context example as a user/assistant pair, then the question; no system turn), and scores a
generation with upstream's parsing and rules, quirks included (docs/parallelbench.md lists them).

API: TASKS, lengths(task), generate(task, split, n_per_length, seed), test_rows(task),
train_rows(task, n, seed), score(row, text), suite_metrics(records). Plain Python, no torch.
"""
import functools
import itertools
import json
import math
import os
import random
import re

from demask import REPO

WAITING_LINE = ("copy", "insert_index", "insert_random", "remove_index", "remove_random",
                "replace_index", "replace_random", "reverse", "shuffle", "sort")
PUZZLES = ("sudoku", "latin_square")
TASKS = WAITING_LINE + PUZZLES

# Upstream's task names (dataset/parallel_bench/data/output/test/*/task_config.yaml).
UPSTREAM_NAMES = {**{t: f"waiting_line/{t}" for t in WAITING_LINE},
                  "sudoku": "puzzle/sudoku_n4_12", "latin_square": "puzzle/latin_square_n4"}

TEST_SEED = 27_000
TRAIN_SEED = 27_001
TEST_SIZE = 100
NAMES_FILE = os.path.join(REPO, "data", "pb", "names.json")

LIST_LENGTHS = (3, 4, 5, 6)
LATIN_SIZE = 4
LATIN_SYMBOLS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
SUDOKU_HOLES = 4
SUDOKU_GIVENS = 16 - SUDOKU_HOLES

# The prompt templates are upstream's (output/test/*/task_config.yaml at the pinned commit),
# reproduced because the model must see the same text; {context} is the list as '["A B", "C D"]'.
_LINE = "You are managing a waiting line at a customer service desk.\n"
_FINAL = "provide only the final list."
PROMPTS = {
    "copy": _LINE + "You need to record the following people in the order they arrived:\n{context}\n"
            "Please copy the list exactly and " + _FINAL + "\n",
    "insert_index": _LINE + 'A new person "{word}" is inserted into the line at position {index}:\n'
                    "{context}\nPlease put the new person at the specified position and " + _FINAL + "\n",
    "insert_random": _LINE + 'A new person "{word}" is inserted into the line at a random position:\n'
                     "{context}\nPlease put the new person in the random position and " + _FINAL + "\n",
    "remove_index": _LINE + "The person at position {index} has left the waiting line:\n{context}\n"
                    "Please remove the person at the specified position and " + _FINAL + "\n",
    "remove_random": _LINE + "One person has left the waiting line:\n{context}\n"
                     "Please remove a random person and " + _FINAL + "\n",
    "replace_index": _LINE + 'The person at position {index} must be replaced with "{word}":\n{context}\n'
                     'Please replace the person at the specified position with "{word}" and ' + _FINAL + "\n",
    "replace_random": _LINE + 'One person in the waiting line must be replaced with "{word}":\n{context}\n'
                      'Please replace one random person with "{word}" and ' + _FINAL,
    "reverse": _LINE + "The previous staff member put the waiting line in the wrong order.\n"
               "Please reverse the order of the following people in the waiting line to correct it:\n"
               "{context}\nPlease reverse the order of the list and " + _FINAL + "\n",
    "shuffle": _LINE + "The waiting line should be randomly shuffled to ensure fair service distribution:\n"
               "{context}\nPlease randomly shuffle the list and " + _FINAL + "\n"
               "Ensure the sequence is different from the original.\n",
    "sort": _LINE + "The following people should be organized alphabetically by last name for efficient "
            "processing:\n{context}\nPlease sort the list in alphabetical order and " + _FINAL + "\n",
    "sudoku": "Fill the positions where the values are 0 in a 4x4 grid with digits 1-4 so that each column, "
              "each row, and each of the four 2x2 subgrids that compose the grid contains all of the digits "
              "from 1 to 4.\n\nInput:\n{sudoku}\nOutput:\n",
    "latin_square": "Generate a Latin square of size {size} with the symbols {symbols}. "
                    "Only output the final result as CSV.",
}


# ---------------------------------------------------------------------------
# Names and formatting

@functools.lru_cache(maxsize=1)
def name_pool():
    """Every 'First Last' of the name list, first names outer, in file order."""
    with open(NAMES_FILE, encoding="utf-8") as f:
        names = json.load(f)
    return tuple(f"{first} {last}" for first in names["first"] for last in names["last"])


def quoted_list(items):
    """A list as upstream writes it: ["a", "b", "c"]."""
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def symbol_list(symbols):
    """Latin-square symbols as upstream writes them in the prompt: [H, 4, C, A]."""
    return "[" + ", ".join(symbols) + "]"


def grid_text(grid, sep=""):
    return "\n".join(sep.join(str(cell) for cell in row) for row in grid)


def lengths(task):
    """The length buckets of a task: list lengths, the Latin-square size, or Sudoku's givens."""
    if task in WAITING_LINE:
        return LIST_LENGTHS
    if task == "latin_square":
        return (LATIN_SIZE,)
    if task == "sudoku":
        return (SUDOKU_GIVENS,)
    raise KeyError(f"unknown ParallelBench task {task!r}; known: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------
# Drawing one sample: {"fields": prompt fields, "answer": as upstream stores it, "target": the
# assistant text of an in-context example, "length", plus what scoring and analysis read}

def _new_name(rng, pool, taken):
    while True:
        name = rng.choice(pool)
        if name not in taken:
            return name


def _shuffled(rng, items):
    out = list(items)
    while out == list(items):
        rng.shuffle(out)
    return out


def _list_sample(fields, answer, target, names, **extra):
    return {"fields": {"context": quoted_list(names), **fields}, "answer": answer, "target": target,
            "length": len(names), "list": names, **extra}


def _draw_waiting_line(task, rng):
    pool = name_pool()
    names = rng.sample(pool, rng.randint(LIST_LENGTHS[0], LIST_LENGTHS[-1]))
    op = task.split("_")[0]
    if op in ("copy", "sort", "reverse"):
        out = {"copy": names, "sort": sorted(names), "reverse": names[::-1]}[op]
        return _list_sample({}, quoted_list(out), quoted_list(out), names)
    if op == "shuffle":
        example = quoted_list(_shuffled(rng, names))
        return _list_sample({}, {"input": names, "example": example}, example, names)
    word = _new_name(rng, pool, names) if op in ("insert", "replace") else None
    index = rng.randint(0, len(names) - (op != "insert"))
    out = list(names)
    if op == "insert":
        out.insert(index, word)
    elif op == "remove":
        out.pop(index)
    else:
        out[index] = word
    word_field = {} if word is None else {"word": word}
    if task.endswith("_index"):
        return _list_sample({**word_field, "index": index}, quoted_list(out), quoted_list(out), names,
                            index=index, **word_field)
    example = quoted_list(out)
    return _list_sample(word_field, {"input": names, **word_field, "example": example}, example, names,
                        **word_field)


def _latin_square(rng, symbols):
    rows = [list(symbols[i:] + symbols[:i]) for i in range(len(symbols))]
    rng.shuffle(rows)
    columns = list(zip(*rows))
    rng.shuffle(columns)
    return [list(row) for row in zip(*columns)]


def _draw_latin_square(rng):
    symbols = rng.sample(LATIN_SYMBOLS, LATIN_SIZE)
    example = grid_text(_latin_square(rng, symbols), sep=",")
    return {"fields": {"size": LATIN_SIZE, "symbols": symbol_list(symbols)},
            "answer": {"symbols": symbols, "example": example}, "target": example,
            "length": LATIN_SIZE, "symbols": symbols}


def _is_sudoku(cells):
    rows = [cells[4 * r:4 * r + 4] for r in range(4)]
    boxes = [[rows[r + a][c + b] for a in (0, 1) for b in (0, 1)] for r in (0, 2) for c in (0, 2)]
    return all(len(set(group)) == 4 for group in rows + list(zip(*rows)) + boxes)


@functools.lru_cache(maxsize=1)
def sudoku_grids():
    """All 288 solved 4×4 Sudoku grids, each as a tuple of 16 digits, in lexicographic order."""
    rows = list(itertools.permutations(range(1, 5)))
    grids = (sum(choice, ()) for choice in itertools.product(rows, repeat=4))
    return tuple(cells for cells in grids if _is_sudoku(cells))


@functools.lru_cache(maxsize=1)
def _sudoku_neighbours():
    """Per grid, the bit masks of the cells where another grid differs from it, for the masks
    small enough to hide under the holes (a puzzle is unique iff none fits in its holes)."""
    grids = sudoku_grids()
    masks = [[sum(1 << i for i in range(16) if g[i] != h[i]) for h in grids if h != g] for g in grids]
    return tuple(tuple(m for m in row if bin(m).count("1") <= SUDOKU_HOLES) for row in masks)


def _draw_sudoku(rng):
    grids = sudoku_grids()
    while True:
        g = rng.randrange(len(grids))
        holes = rng.sample(range(16), SUDOKU_HOLES)
        mask = sum(1 << i for i in holes)
        if all(diff & ~mask for diff in _sudoku_neighbours()[g]):  # unique solution
            break
    solution = [grids[g][4 * r:4 * r + 4] for r in range(4)]
    puzzle = [[0 if 4 * r + c in holes else solution[r][c] for c in range(4)] for r in range(4)]
    answer = grid_text(solution)
    return {"fields": {"sudoku": grid_text(puzzle)}, "answer": answer, "target": answer,
            "length": SUDOKU_GIVENS, "puzzle": grid_text(puzzle)}


def draw(task, rng):
    """One random sample of a task from rng."""
    if task in WAITING_LINE:
        return _draw_waiting_line(task, rng)
    if task == "latin_square":
        return _draw_latin_square(rng)
    if task == "sudoku":
        return _draw_sudoku(rng)
    raise KeyError(f"unknown ParallelBench task {task!r}; known: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------
# Rows

def prompt(task, sample):
    return PROMPTS[task].format(**sample["fields"])


def messages(task, sample, example):
    """Upstream's chat: the in-context example as a user/assistant pair, then the question."""
    return [{"role": "user", "content": prompt(task, example)},
            {"role": "assistant", "content": example["target"]},
            {"role": "user", "content": prompt(task, sample)}]


def _row(task, split, i, sample, example):
    extra = {k: v for k, v in sample.items() if k not in ("fields", "answer", "target", "length")}
    return {"id": f"{task}/{split}/{i}", "task": task, "messages": messages(task, sample, example),
            "answer": sample["answer"], "target": sample["target"], "length": sample["length"], **extra}


def _draw_new(task, rng, *excluded):
    while True:
        sample = draw(task, rng)
        question = prompt(task, sample)
        if not any(question in questions for questions in excluded):
            return sample


def generate(task, split, n_per_length, seed):
    """n_per_length rows per length bucket, ordered by length then by draw (as upstream orders them).

    Samples are drawn i.i.d. and kept while their bucket has room; repeated questions are dropped,
    and for any split but "test" so is every question (and in-context example) of the test set.
    Each row's in-context example is drawn after all questions, from the same generator.
    """
    rng = random.Random(f"parallelbench/{task}/{split}/{seed}")
    excluded = set() if split == "test" else test_questions(task)
    buckets = {length: [] for length in lengths(task)}
    seen = set()
    while any(len(b) < n_per_length for b in buckets.values()):
        sample = _draw_new(task, rng, excluded, seen)
        bucket = buckets[sample["length"]]
        if len(bucket) < n_per_length:
            bucket.append(sample)
            seen.add(prompt(task, sample))
    samples = [s for length in sorted(buckets) for s in buckets[length]]
    examples = [_draw_new(task, rng, excluded) for _ in samples]
    return [_row(task, split, i, s, e) for i, (s, e) in enumerate(zip(samples, examples))]


def test_rows(task):
    """The test split: TEST_SIZE rows, evenly over the task's length buckets."""
    return generate(task, "test", TEST_SIZE // len(lengths(task)), TEST_SEED)


@functools.lru_cache(maxsize=None)
def test_questions(task):
    """The final user turns of the test split."""
    return frozenset(row["messages"][-1]["content"] for row in test_rows(task))


def train_rows(task, n, seed=TRAIN_SEED):
    """n training rows, lengths interleaved round-robin, none asking a test question."""
    buckets = lengths(task)
    rows = generate(task, "train", math.ceil(n / len(buckets)), seed)
    by_length = [[r for r in rows if r["length"] == length] for length in buckets]
    interleaved = [r for group in zip(*by_length) for r in group][:n]
    return [{**r, "id": f"{task}/train/{i}"} for i, r in enumerate(interleaved)]


# ---------------------------------------------------------------------------
# Scoring: upstream's dataset/parallel_bench/metrics.py rules, re-implemented

def parse_list(text, strict=False):
    """The list in a generation: the text after the last '[' and before the next ']'.

    Loose: split at commas, strip spaces and double quotes from each item, drop blank items; a
    missing bracket is tolerated. Strict: both brackets present, items separated by exactly ', ',
    each wrapped in double quotes with none inside; else None.
    """
    if "[" in text:
        text = text.rsplit("[", 1)[1]
    elif strict:
        return None
    if "]" in text:
        text = text.split("]", 1)[0]
    elif strict:
        return None
    if not strict:
        return [item.strip('" ') for item in text.split(",") if item.strip()]
    items = []
    for item in text.split(", "):
        if not (item.startswith('"') and item.endswith('"')) or '"' in item[1:-1]:
            return None
        items.append(item[1:-1])
    return items


def _list_match(pred, answer):
    return pred == parse_list(answer)


def _shuffle_ok(pred, answer):
    return sorted(pred) == sorted(answer["input"]) and pred != answer["input"]


def _insert_ok(pred, answer):
    rest = list(pred)
    if answer["word"] not in rest:
        return False
    rest.remove(answer["word"])
    return rest == answer["input"]


def _remove_ok(pred, answer):
    original = list(answer["input"])
    if len(pred) != len(original) - 1:
        return False
    deleted = set(original) - set(pred)
    if len(deleted) != 1:
        return False
    original.remove(deleted.pop())
    return pred == original


def _replace_ok(pred, answer):
    original = list(answer["input"])
    if len(pred) != len(original) or answer["word"] not in pred:
        return False
    original[pred.index(answer["word"])] = answer["word"]
    return pred == original


LIST_RULES = {"copy": _list_match, "sort": _list_match, "reverse": _list_match,
              "insert_index": _list_match, "remove_index": _list_match, "replace_index": _list_match,
              "shuffle": _shuffle_ok, "insert_random": _insert_ok, "remove_random": _remove_ok,
              "replace_random": _replace_ok}


def _score_list(task, answer, text):
    loose = parse_list(text)
    strict = parse_list(text, strict=True)
    rule = LIST_RULES[task]
    return {"correct": rule(loose, answer), "strict": strict is not None and rule(strict, answer),
            "extracted": loose}


def latin_rows(text, symbols):
    """The first len(symbols) non-blank lines whose comma-separated cells are the symbol set
    (as a set: repeats and extra cells pass), as lists of stripped cells; None if too few."""
    wanted = set(symbols)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    lines = [line for line in lines if {cell.strip() for cell in line.split(",")} == wanted]
    if len(lines) < len(wanted):
        return None
    return [[cell.strip() for cell in line.split(",")] for line in lines[:len(wanted)]]


def _score_latin(answer, text):
    rows = latin_rows(text, answer["symbols"])
    wanted = set(answer["symbols"])
    ok = rows is not None and all(set(group) == wanted for group in rows + list(zip(*rows)))
    return {"correct": ok, "strict": ok, "extracted": rows}


def parse_sudoku(text, strict=False):
    """A 4×4 grid from a generation, or None.

    Loose: drop spaces and commas, keep each non-blank line that holds exactly four digits
    (anywhere in it); exactly four such lines. Strict: exactly four non-blank lines of exactly four
    digit characters each.
    """
    lines = text.strip()
    if not strict:
        lines = lines.replace(" ", "").replace(",", "")
    lines = [line.strip() for line in lines.split("\n") if line.strip()]
    if strict:
        if len(lines) != 4 or any(len(line) != 4 for line in lines):
            return None
        try:
            return [[int(char) for char in line] for line in lines]
        except ValueError:
            return None
    grid = [[int(d) for d in digits] for digits in (re.findall(r"\d", line) for line in lines)
            if len(digits) == 4]
    return grid if len(grid) == 4 else None


def _score_sudoku(answer, text):
    solution = parse_sudoku(answer, strict=True)
    loose = parse_sudoku(text)
    return {"correct": loose == solution, "strict": parse_sudoku(text, strict=True) == solution,
            "extracted": loose}


def score(row, text):
    """Score one generation: correct (upstream's score), strict (its score_strict), extracted."""
    task, answer = row["task"], row["answer"]
    if task in LIST_RULES:
        return _score_list(task, answer, text)
    if task == "latin_square":
        return _score_latin(answer, text)
    if task == "sudoku":
        return _score_sudoku(answer, text)
    raise KeyError(f"unknown ParallelBench task {task!r}; known: {', '.join(TASKS)}")


def suite_metrics(records):
    """Accuracy (%) per task, loose and strict, and their unweighted means over the tasks present.

    records: dicts with "task", "correct" and "strict". Upstream reports each task's mean score ×100.
    """
    per_task = {}
    for task in TASKS:
        mine = [r for r in records if r["task"] == task]
        if mine:
            per_task[task] = {"n": len(mine),
                              "accuracy": 100.0 * sum(bool(r["correct"]) for r in mine) / len(mine),
                              "strict": 100.0 * sum(bool(r["strict"]) for r in mine) / len(mine)}
    means = {key: sum(m[key] for m in per_task.values()) / len(per_task) if per_task else None
             for key in ("accuracy", "strict")}
    return {"tasks": per_task, "mean_accuracy": means["accuracy"], "mean_strict": means["strict"]}


# ---------------------------------------------------------------------------
# Harness settings

SUITE = WAITING_LINE  # the tasks of a `<model>-pb` label (data/pb)
ANSWER_LENGTH = {"waiting_line": 32, "puzzle": 64}  # upstream's max_tokens (cfg/paper/benchmark/*.yaml)


def answer_length(task=None):
    """Generation length of a task (None: the waiting-line suite)."""
    return ANSWER_LENGTH["puzzle" if task in PUZZLES else "waiting_line"]
