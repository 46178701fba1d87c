"""Offline variants of lm-eval's own GSM8K tasks (docs/protocols.md).

Each YAML in this folder names an installed lm-eval task file (`upstream_yaml`, relative to
lm_eval/tasks) and overrides only where the documents come from: `dataset_path: json` with the
repository's data/gsm8k_test.jsonl, which has the Hugging Face `openai/gsm8k` test split's fields
(`question`, `answer`), so no field renaming or process_docs is needed. Everything else (prompt
template, few-shot examples given inline, stop strings, filters, metrics, version) is read from
the installed lm-eval at load time, so the prompts are lm-eval's own.

Why not `include:`: lm-eval resolves `include:` relative to the including YAML or as an absolute
path, and the installed package's folder differs between environments (virtualenv, Python version),
so a committed relative path would point nowhere on most machines. The class below does what
`include:` does (the upstream keys first, the local keys win) with the path found through the
imported lm_eval package. tests/test_protocols.py checks that the rendered prompts equal those of
lm-eval's own task on the same documents.
"""
from pathlib import Path

import lm_eval
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

REPO = Path(__file__).resolve().parents[3]
UPSTREAM_TASKS = Path(lm_eval.__file__).resolve().parent / "tasks"
STRUCTURAL = ("tag", "group", "task_list", "class")


def upstream_config(relative):
    """The installed lm-eval task YAML `relative` (e.g. gsm8k/gsm8k-cot-zeroshot.yaml), its
    `include:`s and `!function`s resolved, without its tags."""
    cfg = load_yaml(UPSTREAM_TASKS / relative, resolve_func=True)
    for key in STRUCTURAL:
        cfg.pop(key, None)
    return cfg


def local_data_files(data_files):
    """data_files relative to the repository root made absolute, so the task runs from any folder."""
    return {split: str(REPO / path) if not Path(path).is_absolute() else path
            for split, path in data_files.items()}


class UpstreamTask(ConfigurableTask):
    """An installed lm-eval task with local overrides (this folder's YAMLs: `class` and
    `upstream_yaml`)."""

    def __init__(self, config=None, **kwargs):
        local = {k: v for k, v in dict(config or {}).items() if k not in STRUCTURAL}
        merged = upstream_config(local.pop("upstream_yaml"))
        metadata = dict(merged.get("metadata") or {})
        metadata.update(local.pop("metadata", None) or {})
        merged.update(local)
        merged["metadata"] = metadata
        dataset_kwargs = dict(merged.get("dataset_kwargs") or {})
        if "data_files" in dataset_kwargs:
            dataset_kwargs["data_files"] = local_data_files(dataset_kwargs["data_files"])
        merged["dataset_kwargs"] = dataset_kwargs
        super().__init__(config=merged, **kwargs)
