"""Decoding traces: recording from the model handle's view (scripted decoders whose order is known),
order statistics, traces in run records (resume, processes), the order figures and report.html,
replayed in a real browser when Chromium is installed."""
import base64
import fcntl
import json
import math
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import custom_demask_eval as cde
from demask import core
from demask import report_html
from demask import trajectories
from demask.settings import RunSettings
from conftest import REPO

MASK = -1  # in a script: re-mask the position
SMALL = ["--gen_length", "8", "--steps", "8", "--block_length", "8"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "custom_demask_eval.py"), *args], capture_output=True,
                          text=True, timeout=600, env=env)


def jsonl(path):
    return [json.loads(line) for line in open(path)]

# ---------------------------------------------------------------------------
# Order statistics


def test_kendall_and_spearman_by_hand():
    # x = [0, 0, 1], y = [1, 0, 0]: pairs (0,1) tied in x, (0,2) discordant, (1,2) tied in y -> -1 / sqrt(2 * 2)
    assert trajectories.kendall_tau_b([0, 0, 1], [1, 0, 0]) == pytest.approx(-0.5)
    # ranks [0.5, 0.5, 2] and [2, 0.5, 0.5]: covariance -0.75, variances 1.5
    assert trajectories.spearman_rho([0, 0, 1], [1, 0, 0]) == pytest.approx(-0.5)
    assert trajectories.kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # one discordant pair of six
    assert trajectories.spearman_rho([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert trajectories.kendall_tau_b([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert math.isnan(trajectories.kendall_tau_b([0, 1], [3, 3])) and math.isnan(trajectories.spearman_rho([0, 1], [3, 3]))
    assert list(trajectories.average_ranks(np.array([5, 1, 5, 5]))) == [2.0, 0.0, 2.0, 2.0]


def test_kendall_and_spearman_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y = rng.integers(0, 5, 30), rng.integers(0, 7, 30)
        assert trajectories.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
        assert trajectories.spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_order_correlations_follow_parallelbench():
    assert trajectories.order_correlations(list(range(8))) == (1.0, 1.0)
    assert trajectories.order_correlations(list(range(8))[::-1]) == (-1.0, -1.0)
    assert trajectories.order_correlations([0, 0, 1, 1, 2, 2]) == (1.0, 1.0)  # neighbours in parallel: still left to right
    assert trajectories.order_correlations([-1, 0, 1, 2]) == (1.0, 1.0)  # a position in place before any forward is left out
    assert all(math.isnan(v) for v in trajectories.order_correlations([3, 3, 3]))


def test_order_summary_pools_forwards_and_skips_undefined_samples():
    traces = [dict(forwards=4, commit_step=[3, 2, 1, 0], undone=[]),
              dict(forwards=2, commit_step=[0, 0, 1, 1], undone=[]),
              dict(forwards=1, commit_step=[0, 0, 0, 0], undone=[[1, 7, 0, 0]])]
    summary = trajectories.order_summary(traces)
    assert summary["kendall_tau"] == 0.0 and summary["spearman_rho"] == 0.0 and summary["n_order_undefined"] == 1
    assert summary["tokens_per_forward"] == pytest.approx(13 / 7)
    assert summary["undone_per_sample"] == pytest.approx(1 / 3)
    assert trajectories.tokens_per_forward(traces[2]) == [5] and summary["n_traces"] == 3
    assert trajectories.order_summary([])["kendall_tau"] is None

# ---------------------------------------------------------------------------
# Recording: scripted decoders on a tiny random model


class Scripted:
    """Writes scripted tokens: scripts[b][f] maps generated positions to the token row b writes after
    its forward f (MASK re-masks); rows beyond the scripts follow the last one. `prefill` is written
    before the first forward. Keeps every forward's logits to check the recorded confidences."""
    batched = True

    def __init__(self, scripts, prefill=None, in_place=False):
        self.scripts, self.prefill, self.in_place, self.seen = scripts, prefill or {}, in_place, []

    def decode(self, model, input_ids, gen_length, steps, block_length):
        P = input_ids.shape[1]
        x = F.pad(input_ids.to(model.device), (0, gen_length), value=model.mask_id)
        for pos, token in self.prefill.items():
            x[:, P + pos] = token
        f = 0
        while (x[:, P:] == model.mask_id).any():
            logits = model(x).logits
            self.seen.append(logits.clone())
            if self.in_place:
                logits.mul_(2)
            for b in range(len(x)):
                script = self.scripts[min(b, len(self.scripts) - 1)]
                for pos, token in (script[f] if f < len(script) else {}).items():
                    x[b, P + pos] = model.mask_id if token == MASK else token
            f += 1
        return x, f


class RowByRow(Scripted):
    batched = False


class Remasking(Scripted):
    remasks = True


RIGHT_TO_LEFT = [{3: 13}, {2: 12}, {1: 11}, {0: 10}]
PAIRS = [{0: 10, 1: 11}, {2: 12, 3: 13}]
AT_ONCE = [{0: 10, 1: 11, 2: 12, 3: 13}]
CFG = RunSettings(gen_length=4, steps=4, block_length=4)


@pytest.fixture(scope="module")
def tiny(tiny_llada):
    return core.load_model(tiny_llada, device="cpu")


def decode(tiny, decoder, prompts=([0, 5, 6],)):
    traces = []
    batch = [dict(id=f"s/{i}", prompt_ids=list(p)) for i, p in enumerate(prompts)]
    gens, counted, _ = core.decode_batch(CFG, tiny, decoder, batch, seed=0, traces=traces)
    assert [t["tokens"] for t in traces] == gens and [t["forwards"] for t in traces] == counted
    return traces


def probability(logits, row, column, token):
    return float(torch.softmax(logits[row, column].float(), -1)[token])


def test_right_to_left_and_left_to_right_orders(tiny):
    decoder = Scripted([RIGHT_TO_LEFT])
    (t,) = decode(tiny, decoder)
    assert t["commit_step"] == [3, 2, 1, 0] and t["tokens"] == [10, 11, 12, 13] and t["forwards"] == 4
    assert trajectories.order_correlations(t["commit_step"]) == (-1.0, -1.0) and trajectories.tokens_per_forward(t) == [1, 1, 1, 1]
    # the confidence is the probability of the written token under the logits of the forward before
    for pos, f in enumerate(t["commit_step"]):
        assert t["confidence"][pos] == pytest.approx(probability(decoder.seen[f], 0, 3 + pos, 10 + pos), rel=1e-3)
    (t,) = decode(tiny, Scripted([RIGHT_TO_LEFT[::-1]]))
    assert t["commit_step"] == [0, 1, 2, 3] and trajectories.order_correlations(t["commit_step"]) == (1.0, 1.0)


def test_left_padded_batch_rows_keep_their_own_forwards(tiny):
    decoder = Scripted([RIGHT_TO_LEFT, PAIRS, AT_ONCE])
    traces = decode(tiny, decoder, prompts=([0, 5, 6, 7, 8], [0, 9], [0, 11, 12]))
    assert [t["commit_step"] for t in traces] == [[3, 2, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert [t["forwards"] for t in traces] == [4, 2, 1]  # a finished row is no longer counted
    assert [trajectories.tokens_per_forward(t) for t in traces] == [[1, 1, 1, 1], [2, 2], [4]]
    summary = trajectories.order_summary(traces)
    assert summary["kendall_tau"] == 0.0 and summary["n_order_undefined"] == 1
    assert summary["tokens_per_forward"] == pytest.approx(12 / 7)
    # row 1 is left-padded to the batch's 5 prompt columns: position 3 is column 5 + 3
    assert traces[1]["confidence"][3] == pytest.approx(probability(decoder.seen[1], 1, 8, 13), rel=1e-3)


def test_batch_one_decoder_is_recorded_row_by_row(tiny):
    decoder = RowByRow([RIGHT_TO_LEFT])
    traces = decode(tiny, decoder, prompts=([0, 5, 6, 7, 8], [0, 9]))
    assert [t["commit_step"] for t in traces] == [[3, 2, 1, 0]] * 2 and len(decoder.seen) == 8
    # the second row's forwards (seen[4:]) have its own, unpadded prompt of 2 tokens
    assert traces[1]["confidence"][0] == pytest.approx(probability(decoder.seen[7], 0, 2, 10), rel=1e-3)


def test_remasking_decoder_undone_tokens(tiny):
    script = [{0: 10, 1: 11}, {0: MASK, 2: 12}, {0: 20, 1: 21, 3: 13}]  # re-mask 0, then overwrite 1 directly
    (t,) = decode(tiny, Remasking([script]))
    assert t["tokens"] == [20, 21, 12, 13] and t["commit_step"] == [2, 2, 1, 2] and t["forwards"] == 3
    assert t["undone"] == [[0, 10, 0, 1], [1, 11, 0, 2]]
    assert trajectories.tokens_per_forward(t) == [2, 1, 3] and trajectories.order_summary([t])["undone_per_sample"] == 2


def test_confidence_null_when_not_computed_or_changed_in_place(tiny):
    class QueryOne(Scripted):
        def decode(self, model, input_ids, gen_length, steps, block_length):
            P = input_ids.shape[1]
            x = F.pad(input_ids.to(model.device), (0, gen_length), value=model.mask_id)
            self.seen.append(model(x, query_idx=torch.tensor([[P + 0]])).logits.clone())
            x[:, P:P + 2] = torch.tensor([10, 11])  # position 1 was not computed by that forward
            self.seen.append(model(x, query_idx=torch.tensor([[P + 3, P + 2]])).logits.clone())
            x[:, P + 2:] = torch.tensor([12, 13])
            return x, 2
    decoder = QueryOne(None)
    (t,) = decode(tiny, decoder)
    assert t["commit_step"] == [0, 0, 1, 1] and t["confidence"][1] is None
    assert t["confidence"][0] == pytest.approx(probability(decoder.seen[0], 0, 0, 10), rel=1e-3)
    assert t["confidence"][2] == pytest.approx(probability(decoder.seen[1], 0, 1, 12), rel=1e-3)
    (t,) = decode(tiny, Scripted([PAIRS], in_place=True))
    assert t["commit_step"] == [0, 0, 1, 1] and t["confidence"] == [None] * 4
    (t,) = decode(tiny, Scripted([[{1: 11}, {2: 12, 3: 13}]], prefill={0: 10}))
    assert t["commit_step"] == [-1, 0, 1, 1] and t["confidence"][0] is None and t["forwards"] == 2


def test_guidance_calls_advance_the_forward_index_by_their_count(tiny):
    class Guided(Scripted):
        def decode(self, model, input_ids, gen_length, steps, block_length):
            P = input_ids.shape[1]
            x = F.pad(input_ids.to(model.device), (0, gen_length), value=model.mask_id)
            for pos in range(gen_length):
                unprompted = x.clone()
                unprompted[:, :P] = model.mask_id
                model(torch.cat([x, unprompted]))
                x[:, P + pos] = 10 + pos
            return x, gen_length
    (t,) = decode(tiny, Guided(None))
    assert t["forwards"] == 8 and t["commit_step"] == [0, 2, 4, 6] and trajectories.tokens_per_forward(t) == [1, 0] * 4

# ---------------------------------------------------------------------------
# Traces in run records: resume and processes


def test_resume_gives_every_record_its_trace(tmp_path, tiny_llada):
    out = run_cli("--label", "llada-math", "--model_path", tiny_llada, "--limit", "4", *SMALL, "--results_dir",
                  str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "llada-math").iterdir()
    lines = (run / "samples.jsonl").read_text().splitlines(True)
    full = json.load(open(run / "summary.json"))["order"]
    (run / "samples.jsonl").write_text("".join(lines[:2]) + lines[2][:-40])  # the third record cut by a crash
    os.remove(run / "summary.json")
    out = run_cli("--resume", str(run))
    assert out.returncode == 0 and "dropped a line cut off by a crash" in out.stderr
    records = jsonl(run / "samples.jsonl")
    assert len(records) == 4 and all(r["trace"]["forwards"] == r["steps"] for r in records)
    assert json.load(open(run / "summary.json"))["order"] == full


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_merge_records_with_their_traces(tmp_path, tiny_llada):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(REPO, "custom_demask_eval.py"), "--label", "llada-math", "--model_path", tiny_llada, "--limit",
           "4", "--batch_size", "1", *SMALL, "--results_dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "llada-math").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "samples.jsonl", "summary.json"]
    records = jsonl(run / "samples.jsonl")
    assert len(records) == 4 and all(len(r["trace"]["commit_step"]) == 8 for r in records)
    assert json.load(open(run / "summary.json"))["order"]["n_traces"] == 4

# ---------------------------------------------------------------------------
# A real tiny run, its report and report.html


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """Two tiny-math runs of 8 samples (the editable KLASS and left-to-right) and their report."""
    results = tmp_path_factory.mktemp("results")
    out = run_cli("--label", "tiny-math", "--limit", "8", "--results_dir", str(results), "--sweep",
                  "default;left_to_right")
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_cli("report", str(results))
    assert out.returncode == 0, out.stderr[-3000:]
    return results


def run_of(results, decoder):
    (run,) = (results / "tiny-math").glob(f"{decoder}-*")
    return run


def test_tiny_run_traces_match_its_samples(tiny_results):
    lm = core.load_model(cde.TINY, device="cpu")
    for decoder in ("default", "left_to_right"):
        run = run_of(tiny_results, decoder)
        records = jsonl(run / "samples.jsonl")
        assert len(records) == 8
        for r in records:
            t = r["trace"]
            kept, _ = core.cut_at_stop(t["tokens"], lm.stop_ids)
            assert lm.tokenizer.decode(kept, skip_special_tokens=True) == r["generation"]
            assert t["forwards"] == r["steps"] and max(t["commit_step"]) < t["forwards"]
            assert all(c is None or 0 < c <= 1 for c in t["confidence"])
        summary = json.load(open(run / "summary.json"))
        order, steps = summary["order"], summary["metrics"]["avg_steps"]
        assert order["n_traces"] == 8 and order["tokens_per_forward"] == pytest.approx(64 / steps)
    order = json.load(open(run_of(tiny_results, "left_to_right") / "summary.json"))["order"]
    assert order["kendall_tau"] == order["spearman_rho"] == 1.0 and order["tokens_per_forward"] == 1.0


def test_report_has_order_columns_figures_and_html(tiny_results):
    board = (tiny_results / "report.md").read_text()
    assert "| tiny-math τ | tiny-math ρ | tiny-math n |" in board
    row = next(l for l in board.splitlines() if l.startswith("| left_to_right |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6:8] == ["64.0", "1.00"] and float(cells[8]) > 0 and cells[9:12] == ["1.00", "1.00", "8"]
    figures = sorted(tiny_results.glob("order_tiny-math_*.png"))
    assert len(figures) == 2 and all(f.stat().st_size > 5000 and f"({f.name})" in board for f in figures)
    page = (tiny_results / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from the network
    data = json.loads(re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)[1])
    # the editable decoder's family: default@<code hash> (date of its run)
    assert [re.sub(r"@[0-9a-f]{8} \(\d{4}-\d{2}-\d{2}\)$", "", r["caption"]) for r in data["runs"]] == [
        "default", "left_to_right"]
    assert all(len(r["samples"]) == 8 and (tiny_results / r["figure"]).exists() for r in data["runs"])
    vocab = data["vocab"][os.path.relpath(cde.TINY, REPO)]  # models inside the repository: relative to it
    assert all(str(t) in vocab for r in data["runs"] for s in r["samples"] for t in s["tokens"])
    assert "pareto_tiny-math.png" in page and '<table class="leaderboard">' in page


def test_replay_embeds_the_first_samples_in_natural_order(tiny_results, monkeypatch):
    monkeypatch.setattr(report_html, "MAX_SAMPLES", 3)
    ids = [s["id"] for s in report_html.first_samples(trajectories.traced_samples(str(run_of(tiny_results, "default"))))]
    assert ids == ["tiny_math_test/0", "tiny_math_test/1", "tiny_math_test/2"]

# ---------------------------------------------------------------------------
# report.html in a real browser (Chromium over the DevTools protocol on a pipe)

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--remote-debugging-pipe"]


class Chromium:
    """A headless Chromium; DevTools protocol messages go to its fd 3 and come from its fd 4."""

    def __init__(self, binary, profile):
        to_browser, self.to_fd = os.pipe()
        self.from_fd, from_browser = os.pipe()

        def child_fds():
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"], close_fds=False,
                                     preexec_fn=child_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.last_id, self.buffer = 0, b""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method, session=None, **params):
        self.last_id += 1
        message = dict(id=self.last_id, method=method, params=params, **({"sessionId": session} if session else {}))
        os.write(self.to_fd, json.dumps(message).encode() + b"\0")
        deadline = time.time() + 60
        while True:
            while b"\0" not in self.buffer:
                if not select.select([self.from_fd], [], [], max(0.0, deadline - time.time()))[0]:
                    raise TimeoutError(f"Chromium did not answer {method}")
                chunk = os.read(self.from_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the pipe")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self.last_id:  # anything else is an event
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression):
        result = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def open(self, url, width=1400, height=1000):
        self.call("Emulation.setDeviceMetricsOverride", session=self.session, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", session=self.session, url=url)
        deadline = time.time() + 30
        while self.js("document.readyState") != "complete" or not self.js("!!document.getElementById('where')"):
            assert time.time() < deadline, "the page did not load"
            time.sleep(0.1)

    def screenshot(self, selector, path):
        x, y, w, h = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                             ".getBoundingClientRect(); return [r.x, r.y + scrollY, r.width, r.height]; })()")
        shot = self.call("Page.captureScreenshot", session=self.session, format="png", captureBeyondViewport=True,
                         clip=dict(x=x, y=y, width=w, height=h, scale=1))
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self):
        self.call("Browser.close")
        self.proc.wait(timeout=30)
        os.close(self.to_fd)
        os.close(self.from_fd)


def replay_state(browser, pane="pane0"):
    return browser.js(f"""(() => {{ const p = document.getElementById("{pane}");
        return {{where: document.getElementById("where").textContent, masks: p.querySelectorAll(".mask").length,
                 fresh: [...p.querySelectorAll(".new")].map(s => s.title), text: p.querySelector(".seq").textContent,
                 head: p.querySelector("h3").textContent, hidden: p.hidden}}; }})()""")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_report_html_replays_in_chromium(tiny_results, tmp_path):
    runs = json.loads(re.search(r'id="trace-data">(.*?)</script>', (tiny_results / "report.html").read_text(),
                                re.S)[1])["runs"]
    sample = runs[0]["samples"][3]
    browser = Chromium(CHROMIUM, tmp_path / "profile")
    try:
        browser.open((tiny_results / "report.html").as_uri())
        rows = browser.js("[...document.querySelectorAll('table.leaderboard tbody tr')]"
                          ".map(r => r.cells[0].textContent)")
        assert len(rows) == 2 and rows[0].startswith("default@") and rows[1] == "left_to_right"

        # pick a sample of the first run (default), then step forward and back
        browser.js(f"const s = document.getElementById('sample'); s.value = {json.dumps(sample['id'])};"
                   "s.dispatchEvent(new Event('change'))")
        start = replay_state(browser)
        assert start["where"] == f"step 0 / {sample['forwards']}" and start["masks"] == 64 and not start["fresh"]
        browser.js("document.getElementById('next').click()")
        after = replay_state(browser)
        written = trajectories.tokens_per_forward(sample)[0]
        assert after["where"].startswith("step 1 /") and after["masks"] == 64 - written == 64 - len(after["fresh"])
        assert all("written after forward 0 · p = " in title for title in after["fresh"])
        browser.js("document.getElementById('prev').click()")
        assert replay_state(browser) == start
        browser.js("document.getElementById('last').click()")
        assert replay_state(browser)["masks"] == 0

        # the comparison view: the same sample under left_to_right, one token per forward
        browser.js("const c = document.getElementById('cmp'); c.value = '1'; c.dispatchEvent(new Event('change'));"
                   "document.getElementById('first').click(); document.getElementById('next').click();"
                   "document.getElementById('next').click()")
        right = replay_state(browser, "pane1")
        assert not right["hidden"] and "left_to_right" in right["head"] and right["masks"] == 62
        assert len(right["fresh"]) == 1 and "position 1 · written after forward 1" in right["fresh"][0]
        assert "cmp=1" in browser.js("location.hash") and "step=2" in browser.js("location.hash")
        browser.screenshot("#replay", tmp_path / "replay.png")
    finally:
        browser.close()
    png = (tmp_path / "replay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
