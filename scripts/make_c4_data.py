#!/usr/bin/env python3
"""Build data/c4_continuation.jsonl from a C4 validation file (docs/protocol.md §10.1).

Selection, in file order:
  * tokenise `text` with the GPT-2 tokenizer in data/gpt2_tokenizer/ (no special tokens added);
  * a document is eligible if it has >= 256 GPT-2 tokens;
  * an eligible document is kept if both cuts are clean: decode(ids[:32]) re-encodes to ids[:32]
    and decode(ids[:256]) re-encodes to ids[:256];
  * the first 256 kept documents are written, each as
    {"id": <0..255>, "file_index": <line number in the source, 0-based>,
     "prefix": decode(ids[:32]), "reference": decode(ids[32:256])}.

Usage (from the repository root):
    python scripts/make_c4_data.py SOURCE_JSONL [--out data/c4_continuation.jsonl]

SOURCE_JSONL: C4 documents as JSON Lines; data/c4_continuation.jsonl was built from the first 1,000
rows of validation/c4_validation_2k.parquet in the hub dataset yxanul/yxanul_0.6B (data/SOURCES.md
gives the commit and sha256).
The script prints the skipped (eligible but unclean) file indices and the kept index range.
"""
import argparse
import hashlib
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N_DOCS = 256
PREFIX_LEN = 32
TOTAL_LEN = 256


def load_tokenizer():
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(os.path.join(REPO_ROOT, "data", "gpt2_tokenizer"))
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert "<|endoftext|>" in tok.all_special_tokens
    return tok


def select(lines, tok, n_docs=N_DOCS):
    """Return (records, skipped_file_indices, n_eligible_scanned)."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    records, skipped = [], []
    for file_index, line in enumerate(lines):
        if len(records) == n_docs:
            break
        text = json.loads(line)["text"]
        ids = enc(text)
        if len(ids) < TOTAL_LEN:
            continue
        prefix = tok.decode(ids[:PREFIX_LEN])
        whole = tok.decode(ids[:TOTAL_LEN])
        if enc(prefix) != ids[:PREFIX_LEN] or enc(whole) != ids[:TOTAL_LEN]:
            skipped.append(file_index)
            continue
        records.append({
            "id": len(records),
            "file_index": file_index,
            "prefix": prefix,
            "reference": tok.decode(ids[PREFIX_LEN:TOTAL_LEN]),
        })
    return records, skipped


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="C4 validation documents as JSON Lines (field `text`)")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "data", "c4_continuation.jsonl"))
    args = ap.parse_args(argv)

    with open(args.source, "rb") as fh:
        raw = fh.read()
    print(f"source {args.source}: sha256 {hashlib.sha256(raw).hexdigest()}", file=sys.stderr)
    lines = raw.decode("utf-8").splitlines()

    tok = load_tokenizer()
    records, skipped = select(lines, tok)
    if len(records) < N_DOCS:
        sys.exit(f"only {len(records)} documents kept, need {N_DOCS}")

    with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {args.out}; kept file indices "
          f"{records[0]['file_index']}..{records[-1]['file_index']}; "
          f"skipped (unclean cut) {skipped}", file=sys.stderr)


if __name__ == "__main__":
    main()
