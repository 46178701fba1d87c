"""Train the tiny ParallelBench model (models/tiny-pb): the bundled model's architecture on ParallelBench's tasks.

    python scripts/train_tiny_pb.py --device cuda                      # the shipped weights' recipe
    python scripts/train_tiny_pb.py --device cpu --steps 3 --per_task 50 --out /tmp/tiny-pb   # smoke run

Tokenizer: a 2048-token byte-level BPE of its own (scripts/make_tiny_data.train_tokenizer, the bundled
model's special tokens and chat template), trained on the training rows' prompts and answers, so a name
is a token or two and six names fit in ParallelBench's 32-token answer. Data: --per_task fresh training
rows of every task (demask.parallelbench.train_rows, test inputs excluded), rendered by the chat
template as at evaluation time; the answer is the task's reference answer, then <|eot_id|>, then
<|endoftext|> up to the task's generation length (parallelbench.ANSWER_LENGTH). Objective and loop: scripts/train_tiny.py
(LLaDA's SFT loss, AdamW, cosine schedule); each waiting-line task is drawn equally often, each puzzle
in PUZZLE_SHARE of the examples.
"""
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demask import REPO, parallelbench  # noqa: E402
import make_tiny_data  # noqa: E402
import train_tiny  # noqa: E402

OUT = os.path.join(REPO, "models", "tiny-pb")
TOKENIZER_ROWS = 2000  # per task
PUZZLE_SHARE = 0.03  # of the batches per puzzle: the waiting line is what the tiny regime is for
RECIPE = dict(steps=16000, minutes=5.0, batch_size=256, lr=2e-3, d_model=192, n_layers=6, n_heads=6, mlp=576)


def chat_text(tokenizer, row):
    return tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)


def build_tokenizer(rows, out):
    """The BPE tokenizer, trained on the first TOKENIZER_ROWS rows of each task, saved in `out`."""
    corpus = [m["content"] for task_rows in rows.values() for r in task_rows[:TOKENIZER_ROWS] for m in r["messages"]]
    corpus += [r["target"] for task_rows in rows.values() for r in task_rows[:TOKENIZER_ROWS]]
    tok = make_tiny_data.train_tokenizer(iter(corpus))
    special = make_tiny_data.save_tokenizer(tok, Path(out))
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(out), special


def examples(tokenizer, rows, special):
    """{task: [(prompt ids, answer ids)]}; rows whose answer does not fit the generation length are dropped."""
    out = {}
    for task, task_rows in rows.items():
        prompts = tokenizer([chat_text(tokenizer, r) for r in task_rows], add_special_tokens=False).input_ids
        answers = tokenizer([r["target"] for r in task_rows], add_special_tokens=False).input_ids
        pairs = [(p, train_tiny.pad_answer(a + [special["eot_token_id"]], parallelbench.answer_length(task), special))
                 for p, a in zip(prompts, answers)]
        out[task] = [(p, a) for p, a in pairs if a is not None]
        print(f"{task}: {len(out[task])} examples, {len(pairs) - len(out[task])} dropped (answer too long)")
    return out


def arguments():
    p = train_tiny.arguments(dict(RECIPE, out=OUT))
    p.add_argument("--per_task", type=int, default=15_000, help="training rows per task")
    p.add_argument("--train_seed", type=int, default=parallelbench.TRAIN_SEED, help="seed of the training rows")
    p.add_argument("--puzzle_share", type=float, default=PUZZLE_SHARE, help="share of the examples per puzzle")
    p.add_argument("--init", help="a model folder to continue training from (its weights and tokenizer)")
    return p


def task_shares(tasks, puzzle_share):
    lines = [t for t in tasks if t not in parallelbench.PUZZLES]
    rest = (1 - puzzle_share * (len(tasks) - len(lines))) / len(lines)
    return {t: puzzle_share if t in parallelbench.PUZZLES else rest for t in tasks}


def start_from(init, out):
    """The tokenizer and weights of an earlier run, its tokenizer files copied to `out`."""
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast
    os.makedirs(out, exist_ok=True)
    if os.path.abspath(init) != os.path.abspath(out):
        for name in train_tiny.TOKENIZER_FILES:
            shutil.copy(os.path.join(init, name), out)
    with open(os.path.join(init, "special_ids.json")) as f:
        special = json.load(f)
    with open(os.path.join(init, "training_log.json")) as f:
        earlier = json.load(f)
    return PreTrainedTokenizerFast.from_pretrained(out), special, load_file(os.path.join(init, "model.safetensors")), earlier


def main():
    args = arguments().parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data_start = time.time()
    rows = {t: parallelbench.train_rows(t, args.per_task, args.train_seed) for t in parallelbench.TASKS}
    if args.init:
        tokenizer, special, init, earlier = start_from(args.init, args.out)
    else:
        (tokenizer, special), init, earlier = build_tokenizer(rows, args.out), None, None
    pairs = examples(tokenizer, rows, special)
    packed = train_tiny.pack(pairs, task_shares(list(pairs), args.puzzle_share), special["eos_token_id"], args.device)
    print(f"{len(packed[0])} examples of width {packed[0].shape[1]} ready in {time.time() - data_start:.0f} s")
    config = train_tiny.model_config(special, args)
    net, step, log, seconds = train_tiny.train(args, config, packed, max(parallelbench.ANSWER_LENGTH.values()), init)
    train_tiny.save(args, config, net, step, log, seconds, copy_tokenizer=False,
                    extra=dict(answer_length=parallelbench.ANSWER_LENGTH, continued_from=earlier))


if __name__ == "__main__":
    main()
