"""Published evaluation protocols by name (configs/protocols/, docs/protocols.md) and the offline
lm-eval task variants they run (configs/lm_eval_tasks/gsm8k_local/).

- Every protocol JSON has the required fields and a source for its number (repository, file, commit
  and place, or paper and table); an unverified number says so and is not recorded.
- Every command is what the entry says: the lm-eval commands' model_args go through the `demask`
  model's own constructor and the harness's `resolve` (the model itself is not loaded), the harness
  commands through the label table and `resolve`; settings, decoder, chat template, task and shots
  agree with the entry's fields.
- The local tasks render exactly the prompts of lm-eval's own tasks on the same documents (the
  upstream task is built by lm-eval's TaskManager with its dataset replaced by the local documents),
  with the same configuration apart from where the documents come from, and run end to end with the
  bundled model; nothing touches the network (HF_*_OFFLINE and a socket that refuses to connect).

The lm-eval parts are skipped without lm-eval (requirements-lmeval.txt).
"""
import glob
import importlib.util
import json
import os
import re
import shlex
import socket

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "protocols", "*.json")))
TASKS = os.path.join(REPO, "configs", "lm_eval_tasks")
GSM8K = os.path.join(REPO, "data", "gsm8k_test.jsonl")
TINY = os.path.join(REPO, "models", "tiny-llada")

HAVE_LMEVAL = importlib.util.find_spec("lm_eval") is not None
needs_lmeval = pytest.mark.skipif(not HAVE_LMEVAL, reason="lm-eval is not installed: pip install -r requirements-lmeval.txt")

# local task -> the installed lm-eval task it reuses
LOCAL_TASKS = {"gsm8k_cot_zeroshot_local": "gsm8k_cot_zeroshot", "gsm8k_cot_local": "gsm8k_cot"}
# configuration keys a local variant may change: its name and where the documents come from
DATA_KEYS = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "fewshot_split",
             "validation_split", "metadata"}

REQUIRED = {"name": str, "title": str, "model": str, "benchmark": str, "task": str, "task_kind": str,
            "shots": int, "fewshot_as_multiturn": bool, "chat_template": bool, "chat_template_note": str,
            "gen_length": int, "block_length": int, "steps": int, "upstream": dict, "decoder": str,
            "decoder_args": dict, "temperature": float, "cache": str, "command_note": str, "offline": str,
            "published": dict, "also_published": list, "differences": list}
HEX40 = re.compile(r"^[0-9a-f]{40}$")


def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[1:]}")


def protocols():
    return [json.load(open(path, encoding="utf-8")) for path in PROTOCOL_FILES]


def by_kind(kind):
    return [p for p in protocols() if p["task_kind"] == kind]


def check_source(source, where):
    if "paper" in source:
        assert source["paper"] and source.get("where"), f"{where}: a paper source names the paper and the table"
        return
    for key in ("repo", "file", "commit", "where"):
        assert source.get(key), f"{where}: source lacks {key}"
    assert re.match(r"^[\w.-]+/[\w.-]+$", source["repo"]), f"{where}: repo is owner/name"
    assert HEX40.match(source["commit"]), f"{where}: commit is a full 40-hex sha"


def argv_options(argv):
    """--flag value / --flag (boolean) of a command line -> dict."""
    out, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[argv[i][2:]] = argv[i + 1]
                i += 2
                continue
            out[argv[i][2:]] = True
        i += 1
    return out


# -- the protocol files (no lm-eval needed)

def test_there_are_the_published_protocols():
    names = {p["name"] for p in protocols()}
    assert {"fastdllm-llada-gsm8k-baseline", "fastdllm-llada-gsm8k-parallel", "d3llm-llada-gsm8k-cot-zeroshot",
            "dream-eval-instruct-gsm8k-cot", "klass-llada-gsm8k", "klass-llada-math"} <= names


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=os.path.basename)
def test_protocol_fields_and_source(path):
    p = json.load(open(path, encoding="utf-8"))
    for key, kind in REQUIRED.items():
        assert key in p, f"{key} missing"
        assert isinstance(p[key], kind), f"{key} is not {kind.__name__}"
        assert kind is bool or not isinstance(p[key], bool), f"{key} is a bool"
    assert p["name"] == os.path.splitext(os.path.basename(path))[0]
    assert p["task_kind"] in ("lm-eval", "harness", "opencompass")
    assert p["top_p"] is None or isinstance(p["top_p"], float)
    assert p["cache"] in ("none", "prefix", "dual")
    assert p["gen_length"] % p["block_length"] == 0 and p["steps"] % (p["gen_length"] // p["block_length"]) == 0
    for key in ("repo", "file", "commit", "settings"):
        assert p["upstream"].get(key), f"upstream lacks {key}"
    assert HEX40.match(p["upstream"]["commit"])
    pub = p["published"]
    assert isinstance(pub["verified"], bool) and pub.get("metric") and isinstance(pub.get("note"), str)
    check_source(pub["source"], "published")
    if pub["verified"]:
        assert isinstance(pub["value"], float) and 0 < pub["value"] <= 100
    else:
        assert pub["value"] is None, "an unverified number is not recorded"
        assert pub["note"].startswith("unverified"), "an unverified entry says so"
    for extra in p["also_published"]:
        assert isinstance(extra["value"], float) and extra["setting"] and extra["harness_change"]
    if p["command"] is None:
        assert p["command_note"].startswith("not reproducible here"), "a missing command says why"
    else:
        assert isinstance(p["command"], str)
    if p["local_task"] is not None:
        assert p["offline_command"] and p["local_task"] in p["offline_command"]


def test_docs_table_lists_every_protocol():
    """docs/protocols.md has a table row per entry, with its published number (or 'unverified')."""
    text = open(os.path.join(REPO, "docs", "protocols.md"), encoding="utf-8").read()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    for p in protocols():
        assert p["name"] in rows, f"docs/protocols.md has no row for {p['name']}"
        value = p["published"]["value"]
        assert (f"| {value:g} |" if value is not None else "| unverified") in rows[p["name"]], p["name"]


@pytest.mark.parametrize("p", by_kind("harness"), ids=lambda p: p["name"])
def test_harness_commands_are_the_labels(p):
    """`python custom_demask_eval.py --label L --decoder D`: the label's settings are the entry's and
    the run resolves."""
    import custom_demask_eval as cde
    argv = shlex.split(p["command"])
    assert argv[:2] == ["python", "custom_demask_eval.py"]
    opts = argv_options(argv[2:])
    assert set(opts) == {"label", "decoder"} and opts["label"] == p["task"] and opts["decoder"] == p["decoder"]
    run = cde.LABELS[p["task"]]
    assert (run.model, run.gen_length, run.block_length, run.steps) == (p["model"], p["gen_length"],
                                                                       p["block_length"], p["steps"])
    assert run.temperature == p["temperature"] and run.top_p == p["top_p"]
    for key, value in p["label_settings"].items():
        assert getattr(run, key) == value, key
    resolved = cde.resolve(run.replace(decoder=p["decoder"]))
    assert resolved.decoder == p["decoder"]


# -- lm-eval

@pytest.fixture
def offline(monkeypatch):
    """No network: the hub libraries' offline switches, and a socket that refuses to connect."""
    import datasets
    import huggingface_hub.constants
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def upstream_index():
    from lm_eval.tasks import TaskManager
    return TaskManager()


@pytest.fixture(scope="module")
def local_index():
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=TASKS)


@needs_lmeval
@pytest.mark.parametrize("p", by_kind("lm-eval"), ids=lambda p: p["name"])
def test_lmeval_commands(p, monkeypatch, upstream_index, local_index, offline):
    """The command's model_args build the `demask` model (its loader stubbed) with the entry's
    settings; task, shots and chat template are the entry's; the offline command differs only in
    the local task and --include_path."""
    from types import SimpleNamespace
    from demask import lmeval
    argv = shlex.split(p["command"])
    assert argv[:3] == ["python", "-m", "demask.lmeval"]
    opts = argv_options(argv[3:])
    assert opts["model"] == "demask" and opts["tasks"] == p["task"] and int(opts["num_fewshot"]) == p["shots"]
    assert bool(opts.get("fewshot_as_multiturn")) == p["fewshot_as_multiturn"]
    assert p["task"] in upstream_index.all_tasks
    monkeypatch.setattr(lmeval, "load_model", lambda *a, **k: SimpleNamespace(tokenizer=None))
    lm = lmeval.DemaskLM.create_from_arg_string(opts["model_args"])
    run = lm.run
    assert (run.model, run.decoder, run.gen_length, run.block_length, run.steps) == (
        p["model"], p["decoder"], p["gen_length"], p["block_length"], p["steps"])
    assert run.decoder_args == p["decoder_args"] and run.cache == p["cache"]
    assert run.temperature == p["temperature"] and run.top_p == p["top_p"]
    assert (lm.chat or bool(opts.get("apply_chat_template"))) == p["chat_template"]
    assert not (lm.chat and opts.get("apply_chat_template")), "the chat template is applied once"
    if p["local_task"]:
        assert LOCAL_TASKS[p["local_task"]] == p["task"] and p["local_task"] in local_index.all_tasks
        expected = p["command"].replace(f"--tasks {p['task']} ", f"--tasks {p['local_task']} ").replace(
            " --output_path", " --include_path configs/lm_eval_tasks --output_path")
        assert p["offline_command"] == expected


def local_docs(n=None):
    with open(GSM8K, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return docs[:n] if n else docs


def test_gsm8k_file_has_the_hub_fields():
    """The local variants need no renaming: data/gsm8k_test.jsonl has openai/gsm8k's test fields."""
    docs = local_docs()
    assert len(docs) == 1319 and all(set(d) == {"question", "answer"} for d in docs)
    assert all("#### " in d["answer"] for d in docs)


def fake_chat_template(messages, add_generation_prompt=True):
    """A chat renderer that keeps the message structure visible, to compare chat-mode prompts."""
    return json.dumps({"messages": [dict(m) for m in messages], "generation_prompt": add_generation_prompt})


@pytest.fixture(scope="module")
def task_pairs():
    """{local task: (local Task, lm-eval's own Task on the same documents)}: the upstream task's
    download replaced by the local file's documents (test split; the train split, never drawn by
    these zero-shot / inline-example tasks, gets the same documents)."""
    if not HAVE_LMEVAL:
        pytest.skip("lm-eval is not installed")
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.chdir(REPO)
    try:
        local = TaskManager(include_path=TASKS).load(list(LOCAL_TASKS))["tasks"]
        rows = datasets.Dataset.from_list(local_docs())
        seen = []

        def from_local_file(self, dataset_kwargs=None, **kwargs):
            seen.append(self.config.task)
            self.dataset = datasets.DatasetDict({"test": rows, "train": rows})
        mp.setattr(ConfigurableTask, "download", from_local_file)
        upstream = TaskManager().load(list(LOCAL_TASKS.values()))["tasks"]
        assert sorted(seen) == sorted(LOCAL_TASKS.values())
    finally:
        mp.undo()
    return {name: (local[name], upstream[up]) for name, up in LOCAL_TASKS.items()}


@needs_lmeval
@pytest.mark.parametrize("name", sorted(LOCAL_TASKS))
def test_local_task_config_is_lmevals(name, task_pairs):
    """Prompt template, examples, stop strings, filters, metrics and version: lm-eval's own; only the
    task name and where the documents come from differ."""
    local, upstream = task_pairs[name]
    mine, theirs = local.config.to_dict(), upstream.config.to_dict()
    for cfg in (mine, theirs):  # the few-shot split follows fewshot_split (the train split upstream, none here)
        cfg["fewshot_config"] = {k: v for k, v in (cfg.get("fewshot_config") or {}).items() if k != "split"}
    assert {k: v for k, v in mine.items() if k not in DATA_KEYS} == {k: v for k, v in theirs.items() if k not in DATA_KEYS}
    assert set(mine) - DATA_KEYS == set(theirs) - DATA_KEYS
    assert mine["task"] == name and mine["dataset_path"] == "json"
    assert mine["dataset_kwargs"]["data_files"] == {"test": GSM8K}
    assert local.VERSION == upstream.VERSION
    assert local.config.metadata["version"] == upstream.config.metadata["version"]


@needs_lmeval
@pytest.mark.parametrize("name", sorted(LOCAL_TASKS))
@pytest.mark.parametrize("mode", ["plain", "chat", "chat-multiturn"])
def test_local_prompts_equal_lmevals(name, mode, task_pairs):
    """The first documents rendered by the local task and by lm-eval's own task: the same documents,
    texts, targets, full few-shot contexts (0 shots and the task's default) and requests."""
    local, upstream = task_pairs[name]
    n = 5
    assert [dict(d) for d in local.test_docs()][:n] == [dict(d) for d in upstream.test_docs()][:n] == local_docs(n)
    chat = dict(apply_chat_template=mode != "plain", fewshot_as_multiturn=mode == "chat-multiturn",
                chat_template=fake_chat_template if mode != "plain" else None)
    for doc in local_docs(n):
        assert local.doc_to_text(doc) == upstream.doc_to_text(doc)
        assert local.doc_to_target(doc) == upstream.doc_to_target(doc)
        for shots in sorted({0, upstream.config.num_fewshot}):
            if shots == 0 and mode == "chat-multiturn":
                continue
            assert local.fewshot_context(doc, shots, **chat) == upstream.fewshot_context(doc, shots, **chat)
    for task in (local, upstream):
        task.build_all_requests(limit=n, rank=0, world_size=1, **chat)
    assert [i.arguments for i in local.instances] == [i.arguments for i in upstream.instances]
    assert len(local.instances) == n
    if name == "gsm8k_cot_zeroshot_local" and mode == "plain":  # what the prompt looks like
        assert local.instances[0].arguments[0].startswith("Q: Janet")
        assert local.instances[0].arguments[0].endswith("\nA: Let's think step by step.")


@needs_lmeval
def test_local_tasks_leave_the_other_local_tasks_alone(local_index):
    assert {"demask_tiny_math", "demask_tiny_code", *LOCAL_TASKS} <= set(local_index.all_tasks)


@needs_lmeval
def test_local_tasks_run_offline_with_the_bundled_model(offline):
    """Both variants end to end through lm-eval's evaluator and the `demask` model: two documents each,
    zero-shot, both filters scored, one decoding record per document."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from demask import lmeval
    lm = lmeval.DemaskLM(model=TINY, decoder="confidence_greedy", gen_length=16, steps=16, block_length=16,
                         batch_size=2)
    results = simple_evaluate(model=lm, tasks=sorted(LOCAL_TASKS), task_manager=TaskManager(include_path=TASKS),
                              num_fewshot=0, limit=2)
    for name in LOCAL_TASKS:
        got = results["results"][name]
        assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(got)
        assert results["n-shot"][name] == 0
    records = lm._demask_records
    assert sorted((r["task"], r["doc_id"]) for r in records) == sorted((t, i) for t in LOCAL_TASKS for i in (0, 1))
    assert all(r["forwards"] == 16 for r in records)
