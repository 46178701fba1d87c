"""The bundled tiny LLaDA: loading and every tiny label end to end."""
import json
import os
import re
import subprocess
import sys
import time

import custom_demask_eval as cde
from demask import core
from conftest import REPO


def test_bundled_model_loads_fast():
    start = time.time()
    model = core.load_model(cde.TINY, device="cpu")
    assert time.time() - start < 5
    assert model.family == "llada" and model.mask_id == 2 and model.stop_ids == [0, 5]
    assert model.n_tokens == len(model.tokenizer) == 2048


def run_label(tmp_path, label, *extra, cwd=REPO, script=os.path.join(REPO, "custom_demask_eval.py")):
    out = subprocess.run([sys.executable, script, "--label", label, "--results_dir", str(tmp_path), *extra],
                         capture_output=True, text=True, timeout=600, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_tiny_math_and_code_end_to_end(tmp_path):
    math_out = run_label(tmp_path, "tiny-math", "--limit", "10")
    assert re.search(r"^TRAIN_METRICS: math 10/10 acc=\d\.\d{3} avg_steps=\d+\.\d$", math_out, re.M)
    assert float(re.search(r"^accuracy_tiny-math: (\S+)$", math_out, re.M).group(1)) >= 0.5  # trained weights
    assert "n_samples_tiny-math: 10.0000" in math_out
    code_out = run_label(tmp_path, "tiny-code", "--limit", "10", "--decoder", "confidence_greedy")
    assert "avg_steps_tiny-code: 64.0000" in code_out
    passed = float(re.search(r"^pass@1_tiny-code: (\S+)$", code_out, re.M).group(1))
    assert passed > 0  # the trained model writes working code, not just syntax
    records = [json.loads(l) for l in open(next((tmp_path / "tiny-code").iterdir()) / "samples.jsonl")]
    assert all("```" not in r["completion"] for r in records)


def test_tiny_text_end_to_end(tmp_path):
    out = run_label(tmp_path, "tiny-text", "--limit", "10", "--decoder", "confidence_greedy")
    for name in ("gen_ppl", "mauve", "entropy", "rep2"):
        assert re.search(rf"^{name}_tiny-text: \d+\.\d{{4}}$", out, re.M)
    assert "avg_steps_tiny-text: 48.0000" in out
