"""report.html: the report (report.md's lines as HTML) and a step-by-step replay of each run's traces.

One static file beside report.md and its PNGs, opened from disk (file://): inline CSS and vanilla
JS, no network request. The replay embeds the first MAX_SAMPLES traced samples of each run (ids
in natural order, so runs of one label show the same samples), with the token strings of the
run's tokenizer. The URL hash holds the view (`#run=0&sample=ID&step=3&cmp=1`).
"""
import html
import json
import os
import re
import sys


MAX_SAMPLES = 50

# ---------------------------------------------------------------------------
# The report's markdown (the subset report.py writes: headings, tables, images, lists, paragraphs)


def inline(text):
    """Escaped text with `code` spans and [text](href) links."""
    parts = re.split(r"(`[^`]*`)", text.replace("\\|", "|"))
    out = []
    for part in parts:
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', html.escape(part)))
    return "".join(out)


def table_html(rows, css_class):
    head = "".join(f"<th>{inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows[2:])
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def markdown_html(lines):
    out, i, heading = [], 0, ""
    while i < len(lines):
        line = lines[i]
        image = re.fullmatch(r"!\[(.*)\]\((.+)\)", line)
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            heading = line[level:].strip()
            out.append(f"<h{level}>{inline(heading)}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in re.split(r"(?<!\\)\|", lines[i].strip()[1:-1])])
                i += 1
            out.append(table_html(rows, "leaderboard" if heading.startswith("Leaderboard") else "plain"))
        elif image:
            out.append(f'<figure><img src="{html.escape(image[2])}" alt="{html.escape(image[1])}"></figure>')
            i += 1
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif line.strip():
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ", "![")):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{inline(' '.join(para))}</p>")
        else:
            i += 1
    return "\n".join(out)

# ---------------------------------------------------------------------------
# Replay data


def natural_key(text):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(text))]


def first_samples(records):
    """The first MAX_SAMPLES of a run's traced records, each its trace plus id, verdict and prompt."""
    records = sorted(records, key=lambda r: natural_key(r["id"]))[:MAX_SAMPLES]
    return [dict(r["trace"], id=r["id"], correct=r.get("correct"), prompt=r.get("prompt", "")) for r in records]


def token_texts(model_path, ids):
    """{id: text} from the run's tokenizer (tokenizer files only, never the weights), or None
    when it cannot be loaded (the page then shows ids)."""
    from . import networks
    try:
        if not os.path.isdir(model_path):
            from huggingface_hub import snapshot_download
            model_path = snapshot_download(model_path, allow_patterns=["*.json", "*.txt", "*.jinja"])
        with open(os.path.join(model_path, "config.json")) as f:
            tokenizer = networks.load_tokenizer(model_path, networks.model_family(json.load(f)))
    except Exception as e:  # offline hub, missing files: the replay falls back to ids
        print(f"report: no tokenizer for {model_path} ({type(e).__name__}); the replay shows ids", file=sys.stderr)
        return None
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


def replay_data(views):
    """The page's data: per view its fields (less the records, and `model_path`, which only loads the
    tokenizer: the page names models as the report shows them) and samples; per model the texts of
    the token ids the samples use."""
    runs, used, paths = [], {}, {}
    for view in views:
        samples = first_samples(view["records"])
        runs.append(dict({k: v for k, v in view.items() if k not in ("records", "model_path")}, samples=samples))
        ids = used.setdefault(view["model"], set())
        paths.setdefault(view["model"], view.get("model_path", view["model"]))
        for s in samples:
            ids.update(s["tokens"], (u[1] for u in s["undone"]))
    return dict(runs=runs, vocab={model: token_texts(paths[model], ids) for model, ids in used.items()},
                max_samples=MAX_SAMPLES)

# ---------------------------------------------------------------------------
# The page


def write_html(path, lines, views):
    """views: per shown run with a trace: label, caption, model (as shown), model_path (as recorded),
    figure (its order PNG), order (summary.json's) and records (its samples.jsonl records that have
    a trace)."""
    data = json.dumps(replay_data(views), separators=(",", ":")).replace("</", "<\\/")
    head, rest = PAGE.split("%REPORT%")
    middle, tail = rest.split("%DATA%")
    with open(path, "w") as f:
        f.write(head + markdown_html(lines) + middle + data + tail)


PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Decoder report</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 0 16px 40px; color: #222; }
nav { position: sticky; top: 0; background: #fff; padding: 6px 0; border-bottom: 1px solid #ddd; z-index: 2; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 8px 0; }
figure img, .pane img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
#replay { border-top: 2px solid #444; margin-top: 24px; }
.controls { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin: 8px 0; }
.controls input[type=range] { width: 260px; }
#panes { display: flex; gap: 12px; }
.pane { flex: 1; min-width: 0; border: 1px solid #ccc; border-radius: 4px; padding: 8px; }
.pane h3 { margin: 0 0 4px; font-size: 14px; }
.meta { color: #555; font-size: 12px; margin-bottom: 6px; }
.ok { color: #087a2a; font-weight: 600; }
.bad { color: #b3261e; font-weight: 600; }
.seq { font: 13px/1.9 ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; }
.seq span { border-radius: 2px; }
.seq .tok { background: #eef3fb; }
.seq .new { background: #ffd54a; outline: 1px solid #c79a00; }
.seq .mask { background: #d6d6d6; color: #888; }
.seq .remasked { background: #f4b4b0; color: #7a1c16; }
.seq .special { font-size: 10px; color: #666; }
details { margin: 4px 0; font-size: 12px; }
details pre { white-space: pre-wrap; background: #f7f7f7; padding: 6px; }
</style></head>
<body>
<nav><a href="#top">Report</a><a href="#replay" id="to-replay">Replay</a></nav>
<main id="top">
%REPORT%
</main>
<section id="replay">
<h2>Replay</h2>
<p class="meta">Each forward's input as the model handle saw it: grey = masked, blue = written earlier,
yellow = written after the previous forward (hover a token for its position, forward and confidence),
red = re-masked after the previous forward. The first <span id="cap"></span> traced samples of each run
(ids in natural order); &#10003; correct, &#10007; wrong. Keys: &larr; / &rarr; step.</p>
<div class="controls">
<label>run <select id="run"></select></label>
<label>sample <select id="sample"></select></label>
<label>compare with <select id="cmp"></select></label>
</div>
<div class="controls">
<button id="first">start</button><button id="prev" title="previous forward">&#9664; prev</button>
<input type="range" id="step" min="0" value="0"><button id="next" title="next forward">next &#9654;</button>
<button id="last">result</button><span id="where"></span>
</div>
<div id="panes"><div class="pane" id="pane0"></div><div class="pane" id="pane1" hidden></div></div>
</section>
<script type="application/json" id="trace-data">%DATA%</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("trace-data").textContent);
const $ = id => document.getElementById(id);
const view = {run: 0, sample: null, step: 0, cmp: -1};

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
}
function verdict(correct) {
  return correct === true ? '<span class="ok">&#10003; correct</span>' :
         correct === false ? '<span class="bad">&#10007; wrong</span>' : "";
}
function mark(correct) { return correct === true ? "\u2713 " : correct === false ? "\u2717 " : ""; }
function runName(r) { return r.label + " \u00b7 " + r.caption.replace(/`/g, ""); }
function sampleOf(run, id) { return run.samples.find(s => s.id === id); }

function tokenHtml(run, id, cls, title) {
  const vocab = DATA.vocab[run.model];
  let text = vocab ? vocab[id] : undefined;
  if (text === undefined) text = "#" + id;
  if (/^<\|.*\|>$/.test(text)) { text = text.slice(2, -2); cls += " special"; }
  text = text === "" ? "\u2205" : text.replace(/\n/g, "\u21b5\n");
  return '<span class="' + cls + '" title="' + esc(title) + '">' + esc(text) + "</span>";
}

// The input of forward `step` (step = forwards: the result): per position the token or null.
function tokenAt(s, i, step) {
  if (s.commit_step[i] < step) return {token: s.tokens[i], at: s.commit_step[i], conf: s.confidence[i]};
  for (const [pos, token, at, removed] of s.undone)
    if (pos === i && at < step && step <= removed) return {token: token, at: at, conf: null};
  return null;
}

function paneHtml(run, s, step) {
  const at = Math.min(step, s.forwards);
  let written = 0, parts = [];
  for (let i = 0; i < s.tokens.length; i++) {
    const t = tokenAt(s, i, at);
    if (t === null) {
      const again = s.undone.some(u => u[0] === i && u[3] === at - 1);
      parts.push('<span class="' + (again ? "mask remasked" : "mask") + '" title="position ' + i +
                 (again ? ": re-masked after forward " + (at - 1) : ": masked") + '">\u2591</span>');
      continue;
    }
    const fresh = t.at === at - 1 && at > 0;
    written += fresh ? 1 : 0;
    const when = t.at < 0 ? "in place before the first forward" : "written after forward " + t.at;
    const conf = t.conf === null ? "p not recorded" : "p = " + t.conf;
    const title = "position " + i + " \u00b7 " + when + " \u00b7 " + conf;
    parts.push(tokenHtml(run, t.token, fresh ? "tok new" : "tok", title));
  }
  const stage = at === 0 ? "before the first forward" : at === s.forwards ? "result (after " + at + " forwards)" :
                "input of forward " + at + " of " + s.forwards;
  return "<h3>" + esc(runName(run)) + "</h3>" +
    '<div class="meta">' + esc(s.id) + " " + verdict(s.correct) + " \u00b7 " + stage +
    (at > 0 ? ' \u00b7 <span class="written">' + written + "</span> written after forward " + (at - 1) : "") +
    " \u00b7 \u03c4 " + fmt(run.order.kendall_tau) + ", \u03c1 " + fmt(run.order.spearman_rho) + "</div>" +
    "<details><summary>prompt</summary><pre>" + esc(s.prompt) + "</pre></details>" +
    '<div class="seq">' + parts.join("") + "</div>" +
    '<img src="' + esc(run.figure) + '" alt="order figure of ' + esc(runName(run)) + '">';
}
function fmt(v) { return v === null || v === undefined ? "\u2014" : v.toFixed(2); }

function fillSelects() {
  const run = DATA.runs[view.run];
  $("run").innerHTML = DATA.runs.map((r, i) => "<option value=" + i + ">" + esc(runName(r)) + "</option>").join("");
  $("run").value = view.run;
  $("sample").innerHTML = run.samples.map(s => '<option value="' + esc(s.id) + '">' + esc(mark(s.correct) + s.id) +
                                          "</option>").join("");
  if (!sampleOf(run, view.sample)) view.sample = run.samples.length ? run.samples[0].id : null;
  $("sample").value = view.sample;
  const others = DATA.runs.map((r, i) => [r, i]).filter(([r, i]) => i !== view.run && r.label === run.label);
  if (!others.some(([r, i]) => i === view.cmp)) view.cmp = -1;
  $("cmp").innerHTML = '<option value="-1">none</option>' +
    others.map(([r, i]) => "<option value=" + i + ">" + esc(runName(r)) + "</option>").join("");
  $("cmp").value = view.cmp;
}

function render() {
  const run = DATA.runs[view.run], s = sampleOf(run, view.sample);
  const other = view.cmp >= 0 ? DATA.runs[view.cmp] : null, t = other ? sampleOf(other, view.sample) : null;
  const most = Math.max(s ? s.forwards : 0, t ? t.forwards : 0);
  view.step = Math.max(0, Math.min(view.step, most));
  $("step").max = most;
  $("step").value = view.step;
  $("where").textContent = "step " + view.step + " / " + most;
  $("pane0").innerHTML = s ? paneHtml(run, s, view.step) : "no traced sample";
  $("pane1").hidden = !other;
  if (other) $("pane1").innerHTML = t ? paneHtml(other, t, view.step) : "sample not embedded for this run";
  try {
    history.replaceState(null, "", "#" + new URLSearchParams({run: view.run, sample: view.sample, step: view.step,
                                                              cmp: view.cmp}));
  } catch (e) { /* some browsers refuse history changes on file:// pages; the view still works */ }
}

function go(step) { view.step = step; render(); }

function start() {
  $("cap").textContent = DATA.max_samples;
  if (!DATA.runs.length) {
    $("replay").insertAdjacentHTML("beforeend", "<p>No run with traces under this folder.</p>");
    return;
  }
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.has("run")) {
    view.run = Math.min(DATA.runs.length - 1, Math.max(0, parseInt(hash.get("run"), 10) || 0));
    view.sample = hash.get("sample");
    view.step = parseInt(hash.get("step"), 10) || 0;
    view.cmp = parseInt(hash.get("cmp"), 10);
    if (isNaN(view.cmp)) view.cmp = -1;
  }
  fillSelects();
  render();
  if (hash.has("run")) $("replay").scrollIntoView();
  $("run").onchange = () => { view.run = +$("run").value; fillSelects(); render(); };
  $("sample").onchange = () => { view.sample = $("sample").value; view.step = 0; render(); };
  $("cmp").onchange = () => { view.cmp = +$("cmp").value; render(); };
  $("step").oninput = () => go(+$("step").value);
  $("first").onclick = () => go(0);
  $("prev").onclick = () => go(view.step - 1);
  $("next").onclick = () => go(view.step + 1);
  $("last").onclick = () => go(+$("step").max);
  document.addEventListener("keydown", e => {
    if (e.target.tagName === "SELECT") return;
    if (e.key === "ArrowLeft") go(view.step - 1);
    if (e.key === "ArrowRight") go(view.step + 1);
  });
}
start();
</script>
</body></html>
"""
