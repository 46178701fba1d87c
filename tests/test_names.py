"""Names and identity in the report (issue #25 item 2): a decoder class's `name` and described
fields, one family per version of a decoder's code, Pareto colours and labels, relative paths."""
import json
import os
import re

import matplotlib
import pytest

import custom_demask_eval as cde
from demask import decoders, report
from demask.settings import RunSettings
from conftest import REPO
from honest_samples import write_samples
from test_report import section, table_row
from test_trust import edited_harness, run_cli, shipped_region

SHIPPED_INFO = dict(method_type="adaptive", representative_param="conf_threshold", position_score="confidence",
                    remasks=False, batched=True, cls="custom_demask_eval.DemaskDecoder")
CFAD_INFO = dict(name="cfad", method_type="schedule", representative_param="factor", position_score="margin",
                 remasks=False, batched=True, cls="custom_demask_eval.DemaskDecoder",
                 summary="confidence-first adaptive decoding")
TOPK_INFO = dict(method_type="topk", representative_param="k", position_score="confidence", remasks=False,
                 batched=False, cls="custom_demask_eval.DemaskDecoder")
THRESHOLD_INFO = dict(method_type="threshold", representative_param="alg_threshold", position_score="confidence",
                      remasks=False, batched=True, cls="demask.decoders.ThresholdDecoder")


def write_run(results, name, decoder, info, fingerprint, accuracy, avg_steps, code=None, label="tiny-math",
              model=None, **settings):
    """A finished run directory as the harness writes it: summary.json and samples.jsonl (the records
    of a complete run, limit 100, with these metrics; the report re-derives them)."""
    base = cde.LABELS[label].replace(decoder=decoder, model=model or os.path.join(REPO, "models", "tiny-llada"))
    decoder_args = settings.pop("decoder_args", {})
    run = base.replace(decoder_args=decoder_args, decoder_info=info, fingerprint=fingerprint, **settings)
    folder = results / label / name
    folder.mkdir(parents=True)
    summary = dict(label=label, decoder=decoder, fingerprint=fingerprint, config=run.to_json(),
                   metrics=dict(accuracy=accuracy, avg_steps=avg_steps, n_samples=100.0))
    if code:
        summary["code"] = code
    json.dump(summary, open(folder / "summary.json", "w"))
    write_samples(folder)
    return folder


class Figures:
    """The Pareto figures report.plot_pareto draws, caught before they are closed."""

    def __init__(self, monkeypatch):
        self.figures, plt = {}, report.pyplot()
        real_close = plt.close

        def close(fig=None):
            if fig is not None and fig.axes:
                self.figures[fig.axes[0].get_title()] = fig
            return real_close(fig)
        monkeypatch.setattr(plt, "close", close)

    def one(self, title_start):
        (fig,) = [f for title, f in self.figures.items() if title.startswith(title_start)]
        return fig.axes[0]


def table_lines(text):
    """The body lines of the first markdown table in text."""
    return [line for line in text.splitlines() if line.startswith("| ")][1:]


def legend_colors(ax):
    """{legend label: RGBA of its points} for the scatter families of a Pareto plot."""
    return {c.get_label(): tuple(c.get_facecolor()[0]) for c in ax.collections
            if isinstance(c, matplotlib.collections.PathCollection) and not c.get_label().startswith("_")
            and len(c.get_facecolor())}


def test_edited_decoders_are_separate_named_families(tmp_path, monkeypatch):
    """The shipped default, an edited default named `cfad` and an edited default without a name
    (described as batch-1 top-k by its class) are three families with their own names and described
    fields in the leaderboard, PBx/AUP, the Pareto legend, report.csv and report.html."""
    results = tmp_path / "results"
    code = dict(shipped="5a1e0000" + "1" * 8, cfad="cfad0000" + "2" * 8, edited="ed170000" + "3" * 8)
    write_run(results, "default-aaaa0001-20260110-101010-000001", "default", SHIPPED_INFO, "aaaa0001" + "0" * 8,
              0.60, 20.0, code["shipped"])
    write_run(results, "default-aaaa0002-20260111-101010-000001", "default", SHIPPED_INFO, "aaaa0002" + "0" * 8,
              0.55, 14.0, code["shipped"], conf_threshold=0.7)
    for seed, accuracy in ((1, 0.70), (2, 0.80)):  # two seeds of one configuration: one cell
        write_run(results, f"default-factor=2-seed={seed}-c1", "default", dict(CFAD_INFO, representative_value=2),
                  "bbbb0002" + "0" * 8, accuracy, 16.0, code["cfad"], decoder_args={"factor": 2}, seed=seed)
    write_run(results, "default-factor=3-c2", "default", dict(CFAD_INFO, representative_value=3), "bbbb0003" + "0" * 8,
              0.65, 11.0, code["cfad"], decoder_args={"factor": 3})
    write_run(results, "default-cccc0001-20260112-090000-000001", "default", TOPK_INFO, "cccc0001" + "0" * 8,
              0.50, 32.0, code["edited"], steps=32)
    write_run(results, "threshold-0.9", "threshold", THRESHOLD_INFO, "dddd0001" + "0" * 8, 0.58, 18.0,
              decoder_args={"alg_threshold": 0.9})
    write_run(results, "other-model", "threshold", THRESHOLD_INFO, "dddd0001" + "0" * 8, 0.40, 18.0,
              model=str(tmp_path / "weights" / "my-llada"), decoder_args={"alg_threshold": 0.9})
    for name in ("default-factor=2-seed=1-c1", "default-factor=2-seed=2-c1", "default-factor=3-c2"):
        os.utime(results / "tiny-math" / name / "summary.json", (1768132800, 1768132800))  # 2026-01-11 12:00 UTC

    figures = Figures(monkeypatch)
    cde.main(["report", str(results)])
    md = (results / "report.md").read_text()
    shipped, edited = f"default@{code['shipped'][:8]} (2026-01-10)", f"default@{code['edited'][:8]} (2026-01-12)"

    # leaderboard: name, type, representative parameter, settings and position score from each version's class
    tiny = md.split("## Model `models/tiny-llada`")[1].split("\n## ")[0]
    board = section(tiny, "### Leaderboard (accuracy labels)")
    assert table_row(board, [shipped, "adaptive", "conf_threshold=0.9", "—", "confidence"])[5] == "60.0"
    assert table_row(board, [shipped, "adaptive", "conf_threshold=0.7", "—", "confidence"])[5] == "55.0"
    cell = table_row(board, ["cfad", "schedule", "factor=2", "—", "margin"])
    assert cell[5] == "75.0 ± 7.1" and cell[11] == "100×2 seeds"
    assert table_row(board, ["cfad", "schedule", "factor=3", "—", "margin"])[5] == "65.0"
    assert table_row(board, [edited, "topk", "k=2", "steps=32", "confidence"])[5] == "50.0"
    assert table_row(board, ["threshold", "threshold", "alg_threshold=0.9", "—", "confidence"])[5] == "58.0"
    names = [line.split(" | ")[0][2:] for line in table_lines(board)]
    assert names == [shipped, shipped, edited, "cfad", "cfad", "threshold"]  # the editable decoder's families first
    assert "- `cfad`: confidence-first adaptive decoding" in board

    # PBx and AUP: one line per family, never one "default" family
    pbx = section(tiny, "### tiny-math: PBx and AUP")
    assert [line.split(" | ")[:2] for line in table_lines(pbx)] == [
        [f"| {shipped}", "2"], [f"| {edited}", "1"], ["| cfad", "2"], ["| threshold", "1"], ["| all methods", "6"]]
    assert "| default |" not in md and "| default " not in md

    # the Pareto plot: one colour per family, all in the legend, every point labelled
    ax = figures.one("tiny-math (tiny-llada)")
    colors = legend_colors(ax)
    assert list(colors) == [shipped, edited, "cfad", "threshold"] and len(set(colors.values())) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [shipped, edited, "cfad", "threshold", "Pareto front"]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted([f"default@{code['shipped'][:8]}", f"default@{code['shipped'][:8]} conf_threshold=0.7",
                             "cfad factor=2", "cfad factor=3", f"default@{code['edited'][:8]} steps=32",
                             "threshold alg_threshold=0.9"])
    off_front = [t for t in ax.texts if t.get_text() == f"default@{code['edited'][:8]} steps=32"]
    assert off_front[0].get_fontsize() < 6  # dominated: smaller, grey

    # paths: the results folder is "this folder", models inside the repository relative to it, others to results
    assert str(tmp_path) not in md and REPO not in md and "runs read from this folder" in md
    assert "## Model `../weights/my-llada`" in md
    page = (results / "report.html").read_text()
    assert str(tmp_path) not in page and REPO not in page and "<td>cfad</td>" in page

    rows = (results / "report.csv").read_text().splitlines()
    assert rows[0].endswith(",family,version") and sum(",cfad," in r for r in rows) == 3


def test_without_code_hash_each_fingerprint_is_a_family(tmp_path, monkeypatch):
    """Runs recorded before summaries had `code`: the editable decoder and plugins fall back to the
    fingerprint (two fingerprints are two families, named by it), runs of one fingerprint over
    seeds stay one cell; a name two versions share gets the hash and date on both."""
    results = tmp_path / "results"
    for seed in (1, 2):
        write_run(results, f"default-ffff0001-2026011{seed}-101010-000001", "default", SHIPPED_INFO,
                  "ffff0001" + "0" * 8, 0.6 + seed / 100, 20.0, seed=seed)
    write_run(results, "default-ffff0002-20260115-101010-000001", "default", SHIPPED_INFO, "ffff0002" + "0" * 8,
              0.5, 10.0)
    plugin = dict(method_type="topk", representative_param="k", position_score="position", remasks=False,
                  batched=True, cls="demask_plugin_mine.RightToLeft")
    write_run(results, "right_to_left-a", "right_to_left", plugin, "eeee0001" + "0" * 8, 0.3, 64.0)
    write_run(results, "right_to_left-b", "right_to_left", plugin, "eeee0002" + "0" * 8, 0.35, 64.0)
    write_run(results, "named-a", "default", dict(CFAD_INFO, representative_value=2), "abab0001" + "0" * 8, 0.7,
              16.0, code="c0de0001" + "0" * 8, decoder_args={"factor": 2})
    write_run(results, "named-b", "default", dict(CFAD_INFO, representative_value=2), "abab0002" + "0" * 8, 0.72,
              16.0, code="c0de0002" + "0" * 8, decoder_args={"factor": 2})
    for name in ("named-a", "named-b", "right_to_left-a", "right_to_left-b"):
        os.utime(results / "tiny-math" / name / "summary.json", (1767261600, 1767261600))  # 2026-01-01
    figures = Figures(monkeypatch)
    cde.main(["report", str(results)])
    md = (results / "report.md").read_text()
    board = section(md, "### Leaderboard (accuracy labels)")
    first = table_row(board, ["default@ffff0001 (2026-01-11)", "adaptive", "conf_threshold=0.9"])
    assert first[5] == "61.5 ± 0.7" and first[11] == "100×2 seeds"
    assert table_row(board, ["default@ffff0002 (2026-01-15)", "adaptive"])[5] == "50.0"
    # 70.0 ≈: 2 of 100 items below the best row (72.0, same samples): the interval of the difference holds 0
    assert table_row(board, ["cfad@c0de0001 (2026-01-01)", "schedule", "factor=2"])[5] == "70.0 ≈"
    assert table_row(board, ["cfad@c0de0002 (2026-01-01)", "schedule", "factor=2"])[5] == "72.0"
    assert table_row(board, ["right_to_left@eeee0001 (2026-01-01)", "topk", "k=1"])[5] == "30.0"
    assert table_row(board, ["right_to_left@eeee0002 (2026-01-01)", "topk", "k=1"])[5] == "35.0"
    pbx = section(md, "### tiny-math: PBx and AUP")
    assert len(table_lines(pbx)) == 6 + 1  # six families, then all methods
    assert len(legend_colors(figures.one("tiny-math"))) == 6


def test_describe_decoder_reads_the_class_attributes():
    run = cde.LABELS["tiny-math"]

    class Pyramid:
        name, method_type, representative_param = "pyr", "schedule", "factor"
        position_score, summary = "margin", "a pyramid schedule"
        batched = False

        def __init__(self, mask_id, factor=2):
            self.mask_id, self.factor = mask_id, factor

        def decode(self, model, input_ids, gen_length, steps, block_length):
            raise NotImplementedError

    info = decoders.describe_decoder("default", Pyramid(0, factor=3), run)
    assert info == dict(name="pyr", method_type="schedule", representative_param="factor", position_score="margin",
                        remasks=False, batched=False, cls=f"{__name__}.{Pyramid.__qualname__}",
                        summary="a pyramid schedule", representative_value=3)
    # a score argument still wins; without attributes the registry entry describes it, and no name is recorded
    assert decoders.describe_decoder("default", Pyramid(0), run.replace(decoder_args={"score": "random"}))[
        "position_score"] == "random"
    class Bare:
        def __init__(self, mask_id):
            self.mask_id = mask_id

        def decode(self, model, input_ids, gen_length, steps, block_length):
            raise NotImplementedError

    entry = cde.DECODERS["default"]
    bare = decoders.describe_decoder("default", Bare(0), run)
    assert "name" not in bare and "summary" not in bare and "representative_value" not in bare
    assert (bare["method_type"], bare["representative_param"], bare["position_score"]) == (
        entry.method_type, entry.representative_param, entry.position_score)
    # the registry takes what the class says unless the call says otherwise, and checks it
    entry = decoders.register_method("test_pyramid_names", Pyramid)
    try:
        assert (entry.method_type, entry.representative_param, entry.position_score, entry.summary) == (
            "schedule", "factor", "margin", "a pyramid schedule")
        assert not entry.uses_steps
    finally:
        del decoders.DECODERS["test_pyramid_names"]
    for attribute, value, message in [("method_type", "pyramid", "method_type must be one of"),
                                      ("name", "my decoder", "name must be"), ("name", "a@b", "name must be")]:
        bad = type("Bad", (Pyramid,), {attribute: value})
        with pytest.raises(ValueError, match=message):
            decoders.register_method("test_bad_names", bad)
        with pytest.raises(ValueError, match=message):
            decoders.describe_decoder("default", bad(0), run)
    assert "test_bad_names" not in decoders.DECODERS


CFAD_ATTRIBUTES = '''    name = "cfad"
    method_type = "schedule"
    representative_param = "history_length"
    position_score = "margin"
    summary = "confidence-first adaptive decoding"
'''
TOPK_ATTRIBUTES = '''    method_type = "topk"
    representative_param = "k"
'''


def test_cli_edited_decoders_named_in_the_report(tmp_path, monkeypatch):
    """Real runs: the shipped entry script, an edited copy whose class is named `cfad`, and an edited
    copy without a name (another rule): three families in the report, described by their classes."""
    results = tmp_path / "results"
    args = ["--label", "tiny-math", "--limit", "4", "--results_dir", str(results)]
    region, decode = shipped_region(), "\n    @torch.no_grad()\n    def decode("
    assert region.count(decode) == 1  # the attributes go last in the class body: they win over shipped ones
    cfad = edited_harness(tmp_path / "cfad", region.replace(decode, "\n" + CFAD_ATTRIBUTES + decode))
    unnamed = edited_harness(tmp_path / "b", region.replace(decode, "\n" + TOPK_ATTRIBUTES + decode).replace(
        "self.conf_threshold = conf_threshold", "self.conf_threshold = 2.0"))
    for script in (edited_harness(tmp_path / "shipped", region), cfad, unnamed):
        out = run_cli(*args, script=script)
        assert out.returncode == 0, out.stderr[-3000:]
    summaries = {}
    for folder in (results / "tiny-math").iterdir():
        summary = json.load(open(folder / "summary.json"))
        summaries[summary["config"]["decoder_info"].get("name") or summary["config"]["decoder_info"]["method_type"]] = (
            folder, summary)
    assert sorted(summaries) == ["adaptive", "cfad", "topk"]
    assert summaries["cfad"][1]["config"]["decoder_info"]["representative_value"] == 2

    def label(kind):
        folder, summary = summaries[kind]
        stamp = re.search(r"-(\d{4})(\d{2})(\d{2})-\d{6}-\d+$", folder.name)
        return f"default@{(summary.get('code') or summary['fingerprint'])[:8]} ({'-'.join(stamp.groups())})"

    figures = Figures(monkeypatch)
    cde.main(["report", str(results)])
    md = (results / "report.md").read_text()
    board = section(md, "### Leaderboard (accuracy labels)")
    table_row(board, [label("adaptive"), "adaptive", "conf_threshold=0.9", "—", "confidence"])
    table_row(board, ["cfad", "schedule", "history_length=2", "—", "margin"])
    table_row(board, [label("topk"), "topk", "k=1", "—", "confidence"])
    pbx = section(md, "### tiny-math: PBx and AUP")
    families = {label("adaptive"), "cfad", label("topk")}  # in the order of their first run, then by name
    assert sorted(line.split(" | ")[0][2:] for line in table_lines(pbx)) == sorted(families | {"all methods"})
    ax = figures.one("tiny-math")
    assert [t.get_text() for t in ax.get_legend().get_texts()][3:] == ["Pareto front"]
    assert set(legend_colors(ax)) == families and len(set(legend_colors(ax).values())) == 3
    assert len(ax.texts) == 3  # every point labelled
    assert "## Model `models/tiny-llada`" in md and str(results) not in md and REPO not in md
    data = (results / "report.html").read_text()
    assert str(results) not in data and f'"{label("adaptive")}' in data  # replay captions
