"""--cache prefix|dual (kvcache.py; models.refresh_forward, models.cached_forward): the cached forward
against the full one, when the handle refreshes, guidance rows, and the CLI (recorded mode, run names,
counts, resume, report)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import custom_demask_eval as cde
from demask import core, decoders
from demask import kvcache
from demask.settings import RunSettings
from conftest import REPO

TINY = os.path.join(REPO, "models", "tiny-llada")
G, L = 16, 8


@pytest.fixture(scope="module")
def bundled():
    return core.load_model(TINY, device="cpu")


@pytest.fixture(scope="module")
def dream(tiny_dream):
    return core.load_model(tiny_dream, device="cpu")


def one_layer(lm):
    """The model with its first layer only: its keys and values depend on a position's own token
    alone, so a cached forward is exact wherever the cached positions' tokens are unchanged."""
    blocks = lm.net.parts()[1]
    kept = type(blocks)(list(blocks)[:1])
    if lm.family == "llada":
        lm.net.model.transformer.blocks = kept
    else:
        lm.net.model.layers = kept
    return blocks


def restore(lm, blocks):
    if lm.family == "llada":
        lm.net.model.transformer.blocks = blocks
    else:
        lm.net.model.layers = blocks


def state(lm):
    """Three left-padded rows: row 0 is in block 1 (block 0 committed), rows 1 and 2 in block 0."""
    ids, mask = core.left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]], lm.pad_id)
    x = F.pad(ids, (0, G), value=lm.mask_id)
    P = ids.shape[1]
    x[0, P:P + L] = torch.arange(30, 30 + L)
    x[1, P + 2:P + 4] = torch.tensor([40, 41])
    return x, F.pad(mask, (0, G), value=True), P


def fresh_tokens(lm, mode, P, T, block):
    """Token positions whose logits a cached forward recomputes: the block (Dream: and the next
    token, predicted by the block's last position) or everything from the block on."""
    start = P + block * L
    end = T if mode == "prefix" else start + L + (lm.family == "dream")
    return torch.arange(T)[(torch.arange(T) >= start) & (torch.arange(T) < end)]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cached_forward_on_unchanged_input_equals_the_full_forward(bundled, dream, family, mode):
    lm = bundled if family == "llada" else dream
    x, key, P = state(lm)
    T = x.shape[1]
    full = lm.logits(x, key)
    cache = kvcache.BatchCache(lm, mode, P, L)
    refreshed = cache(x, key, None, None)
    assert [(r.tolist(), c) for r, c in cache.work] == [([0, 1, 2], T)]
    cached = cache(x, key, None, None)
    shift = lm.net.shift
    computed = G + shift if mode == "prefix" else L + shift  # prefix: row 0's shorter window is padded
    assert [(r.tolist(), c) for r, c in cache.work] == [([0, 1, 2], computed)]
    assert (refreshed - full).abs().max() < 1e-5 and (cached - full).abs().max() < 1e-5
    query = P + torch.tensor([[8, 9, 15], [0, 3, 7], [1, 2, 3]])
    part = cache(x, key, None, query)
    assert (part - full.gather(1, query[..., None].expand(-1, -1, full.shape[-1]))).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cached_forward_recomputes_the_window_and_keeps_the_rest(bundled, dream, family, mode):
    """After commits inside the current blocks: with one layer the recomputed positions equal the
    full forward of the new input (nothing cached is stale), every other position keeps the refresh's
    logits; with all layers the recomputed logits differ from the full forward (the approximation)."""
    lm = bundled if family == "llada" else dream
    x, key, P = state(lm)
    T = x.shape[1]
    later = x.clone()
    later[0, P + L + 1], later[1, P + 5], later[2, P] = 50, 51, 52
    blocks = one_layer(lm)
    try:
        cache = kvcache.BatchCache(lm, mode, P, L)
        first = cache(x, key, None, None)
        cached = cache(later, key, None, None)
        assert all(c < T for _, c in cache.work)
        new = lm.logits(later, key)
        for row, block in enumerate([1, 0, 0]):
            fresh = fresh_tokens(lm, mode, P, T, block)
            kept = torch.ones(T, dtype=torch.bool)
            kept[fresh] = False
            assert (cached[row, fresh] - new[row, fresh]).abs().max() < 1e-5
            assert torch.equal(cached[row, kept], first[row, kept])
            assert (new[row, kept] - first[row, kept]).abs().max() > 1e-4  # the full forward does see the commits
    finally:
        restore(lm, blocks)
    cache = kvcache.BatchCache(lm, mode, P, L)
    cache(x, key, None, None)
    cached, new = cache(later, key, None, None), lm.logits(later, key)
    assert (cached[1, fresh_tokens(lm, mode, P, T, 0)] - new[1, fresh_tokens(lm, mode, P, T, 0)]).abs().max() > 1e-4


def test_rows_refresh_on_a_new_block_or_changed_cached_input(bundled):
    lm = bundled
    x, key, P = state(lm)
    T = x.shape[1]
    cache = kvcache.BatchCache(lm, "dual", P, L)
    cache(x, key, None, None)

    def work():
        return [(r.tolist(), c) for r, c in cache.work]

    x[1, P:P + L] = 60  # row 1 finishes block 0: its next forward is a refresh, the others stay cached
    out = cache(x, key, None, None)
    assert work() == [([1], T), ([0, 2], L)]
    assert (out[1] - lm.logits(x, key)[1]).abs().max() < 1e-5
    x[2, P - 1] = 61  # a token the dual window does not cover (here the prompt's last) changed
    cache(x, key, None, None)
    assert work() == [([2], T), ([0, 1], L)]
    other = key.clone()
    other[1, 0] = True  # another key mask (attention_mask) for row 1
    cache(x, other, None, None)
    assert work() == [([1], T), ([0, 2], L)]
    cache(x, other, None, None)
    assert work() == [([0, 1, 2], L)]
    x[2, P:] = 62  # a row with no mask left is not computed; the others stay cached
    out = cache(x, other, None, None)
    assert work() == [([0, 1], L)] and not out[2].any()
    guided = torch.cat([x, x])
    cache(guided, torch.cat([other, other]), None, None)  # 2B rows: a new cache
    assert work() == [([0, 1, 3, 4], T)]
    cache(guided, torch.cat([other, other]), None, None)
    assert work() == [([0, 1, 3, 4], L)]


class Guided:
    """A classifier-free-guidance style decoder: every forward holds the conditional rows and the
    same rows with the prompt masked (2B rows); commits the most confident position of the block."""
    batched = True

    def __init__(self, mask_id):
        self.mask_id = mask_id

    def decode(self, model, input_ids, gen_length, steps, block_length):
        B, P = input_ids.shape
        x = F.pad(input_ids.to(model.device), (0, gen_length), value=self.mask_id)
        used = 0
        while (x[:, P:] == self.mask_id).any():
            plain = x.clone()
            plain[:, :P] = self.mask_id
            both = model(torch.cat([x, plain])).logits
            logits = 2 * both[:B] - both[B:]
            block = (x[:, P:] == self.mask_id).float().argmax(1) // block_length
            pos = torch.arange(gen_length)[None]
            open_ = (x[:, P:] == self.mask_id) & (pos // block_length == block[:, None])
            conf = torch.where(open_, F.softmax(logits[:, P:], -1).max(-1).values, -1.0)
            best = conf.argmax(1)
            x[torch.arange(B), P + best] = choosable_argmax(logits[:, P:], model)[torch.arange(B), best]
            used += 1
        return x, used


def choosable_argmax(logits, model):
    return decoders.choosable(logits, model).argmax(-1)


def test_guidance_rows_are_cached_and_counted_twice(bundled):
    lm = bundled
    ids, mask = core.left_pad([[5, 6, 7, 8], [9, 10]], lm.pad_id)
    checker = core.RuleChecker(["a", "b"], ids, G, G, L, lm.mask_id, lm.n_tokens, False)
    nfe = torch.zeros(2, dtype=torch.long)
    cache = kvcache.BatchCache(lm, "dual", ids.shape[1], L)
    model, widths = core.batch_model(lm, mask, checker, nfe, cache=cache), []

    def call(*args):
        out = model(*args)
        widths.append([c for _, c in cache.work])
        return out
    x, used = Guided(lm.mask_id).decode(core.DecoderModel(lm, call), ids, G, G, L)
    checker.finish(x)
    assert used == G and nfe.tolist() == [2 * G, 2 * G]
    T = ids.shape[1] + G
    assert widths == [[T]] + [[L]] * (L - 1) + [[T]] + [[L]] * (L - 1)  # one refresh per block


def run(tmp_path, *args):
    return cde.main(["--label", "tiny-math", "--limit", "4", "--batch_size", "2", "--results_dir", str(tmp_path),
                     *args])


def run_dir(tmp_path, prefix):
    (found,) = [p for p in (tmp_path / "tiny-math").iterdir() if p.name.startswith(prefix + "-")]
    return found


def test_cli_records_the_mode_and_keeps_runs_apart(tmp_path, capsys):
    metrics = {}
    for mode in ("none", "prefix", "dual"):
        metrics[mode] = run(tmp_path, "--decoder", "confidence_greedy", "--cache", mode)
    runs = {m: run_dir(tmp_path, "confidence_greedy" + ("" if m == "none" else "+" + m)) for m in metrics}
    configs = {m: json.load(open(d / "config.json")) for m, d in runs.items()}
    summaries = {m: json.load(open(d / "summary.json")) for m, d in runs.items()}
    assert "cache" not in configs["none"]
    assert configs["prefix"]["cache"] == "prefix" and configs["dual"]["cache"] == "dual"
    assert all(summaries[m]["config"] == configs[m] for m in runs)
    assert len({c["fingerprint"] for c in configs.values()}) == 3 and len(set(runs.values())) == 3
    for mode, summary in summaries.items():
        notes = [d for d in summary["deviations_from_klass"] if d.startswith("--cache")]
        assert notes == ([] if mode == "none" else [kvcache.deviations(RunSettings.from_json(configs[mode]))[0]])
        assert summary["metrics"]["avg_steps"] == 64.0 == metrics[mode]["avg_steps"]  # 64 counted forwards each
        records = [json.loads(line) for line in open(runs[mode] / "samples.jsonl")]
        assert [r["steps"] for r in records] == [64] * 4 and [r["trace"]["forwards"] for r in records] == [64] * 4
    cde.main(["report", str(tmp_path)])
    report = open(tmp_path / "report.md").read()
    names = [line.split(" | ")[0] for line in report.splitlines() if line.startswith("| confidence_greedy")]
    apart = ["| confidence_greedy", "| confidence_greedy +prefix cache", "| confidence_greedy +dual cache"]
    assert names == apart * 2  # leaderboard rows, then PBx/AUP families

    # a sweep with --cache runs in its own cells
    cde.main(["--label", "tiny-math", "--limit", "2", "--results_dir", str(tmp_path / "s"), "--sweep",
              "confidence_greedy:steps=16", "--cache", "dual"])
    (cell,) = (tmp_path / "s" / "tiny-math").iterdir()
    assert cell.name.startswith("confidence_greedy+dual-steps=16-")


def test_resume_keeps_the_mode_and_refuses_another(tmp_path, capsys):
    run(tmp_path, "--decoder", "threshold", "--cache", "prefix")
    folder = run_dir(tmp_path, "threshold+prefix")
    lines = open(folder / "samples.jsonl").readlines()
    open(folder / "samples.jsonl", "w").writelines(lines[:2])
    for flag in ("dual", "none"):
        with pytest.raises(SystemExit) as e:
            cde.main(["--resume", str(folder), "--cache", flag])
        assert e.value.code == 2 and "drop --cache" in capsys.readouterr().err
    cde.main(["--resume", str(folder)])
    summary = json.load(open(folder / "summary.json"))
    assert summary["config"]["cache"] == "prefix" and summary["metrics"]["n_samples"] == 4
    config = json.load(open(folder / "config.json"))
    del config["cache"]  # edited to an exact run: its fingerprint is not the exact run's
    json.dump(config, open(folder / "config.json", "w"))
    with pytest.raises(SystemExit) as e:
        cde.main(["--resume", str(folder)])
    assert e.value.code == 2 and "differs" in capsys.readouterr().err


def test_bad_mode_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cde.main(["--label", "tiny-math", "--cache", "full"])
    assert e.value.code == 2 and "--cache" in capsys.readouterr().err


PASTED = '''
import torch
import torch.nn.functional as F
import custom_demask_eval as cde


class Generate:
    """LLaDA generate.py, low-confidence remasking, batch 1: reads model(x).logits only."""

    def __init__(self, mask_id):
        self.mask_id = mask_id

    @torch.no_grad()
    def decode(self, model, input_ids, gen_length, steps, block_length):
        P = input_ids.shape[1]
        x = torch.full((1, P + gen_length), self.mask_id, dtype=torch.long, device=model.device)
        x[:, :P] = input_ids
        per_block = steps // (gen_length // block_length)
        for b in range(gen_length // block_length):
            lo, hi = P + b * block_length, P + (b + 1) * block_length
            k = cde.get_num_transfer_tokens(x[:, lo:hi] == self.mask_id, per_block)
            for i in range(per_block):
                logits = model(x).logits
                x0 = cde.choosable(logits, model).argmax(-1)
                p = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
                p[:, :lo] = -torch.inf
                p[:, hi:] = -torch.inf
                p = torch.where(x == self.mask_id, p, -torch.inf)
                idx = torch.topk(p[0], int(k[0, i])).indices
                x[0, idx] = x0[0, idx]
        return x, steps


cde.register_method("pasted_generate", Generate, method_type="topk", representative_param="k")
'''


def test_pasted_batch_one_decoder_runs_under_dual_cache(tmp_path, capsys):
    plugin = tmp_path / "pasted.py"
    plugin.write_text(PASTED)
    try:
        pasted = run(tmp_path, "--plugin", str(plugin), "--decoder", "pasted_generate", "--cache", "dual", "--limit", "3")
    finally:
        decoders.DECODERS.pop("pasted_generate", None)
        cde.PLUGIN_FILES.pop("demask_plugin_pasted", None)
    greedy = run(tmp_path, "--decoder", "confidence_greedy", "--cache", "dual", "--batch_size", "1", "--limit", "3")
    assert pasted["avg_steps"] == greedy["avg_steps"] == 64.0
    texts = {name: [json.loads(line)["generation"] for line in open(run_dir(tmp_path, name) / "samples.jsonl")]
             for name in ("pasted_generate+dual", "confidence_greedy+dual")}
    assert texts["pasted_generate+dual"] == texts["confidence_greedy+dual"]
    assert json.load(open(run_dir(tmp_path, "pasted_generate+dual") / "config.json"))["cache"] == "dual"
