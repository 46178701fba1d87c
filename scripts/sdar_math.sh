#!/usr/bin/env bash
# Label sdar-math: see docs/models.md. Honours MODEL_PATH and LIMIT; extra arguments are passed through.
cd "$(dirname "$0")/.." && exec python custom_demask_eval.py --label sdar-math ${MODEL_PATH:+--model_path "$MODEL_PATH"} ${LIMIT:+--limit "$LIMIT"} "$@"
