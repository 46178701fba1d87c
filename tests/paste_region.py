"""Paste a decoder into the editable region of an entry script, as a researcher does:
    python tests/paste_region.py COPY/custom_demask_eval.py tests/fixtures/original_harness_decoder.py
.ci/run uses it to run the test suite once more on a copy of the repository whose region holds a
decoder written for the original harness (the README's test command must pass with it)."""
import sys

START, END = "# --- EDITABLE REGION START ---\n", "# --- EDITABLE REGION END ---\n"


def paste(entry, region):
    source = open(entry).read()
    head, rest = source.split(START)
    _, tail = rest.split(END)
    with open(entry, "w") as f:
        f.write(head + START + region + END + tail)


if __name__ == "__main__":
    paste(sys.argv[1], open(sys.argv[2]).read())
