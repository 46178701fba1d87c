#!/usr/bin/env bash
# Labels tiny-pb (the waiting-line suite) and tiny-pb-<task>: see docs/parallelbench.md. TASK=<task> picks one task
# (e.g. TASK=copy); honours MODEL_PATH and LIMIT; extra arguments are passed through.
cd "$(dirname "$0")/.." && exec python custom_demask_eval.py --label tiny-pb${TASK:+-$TASK} ${MODEL_PATH:+--model_path "$MODEL_PATH"} ${LIMIT:+--limit "$LIMIT"} "$@"
