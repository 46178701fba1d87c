"""The bundled tiny LLaDA: loading, every tiny label end to end, and an original-harness decoder."""
import json
import os
import re
import subprocess
import sys
import time

import custom_demask_eval as cde
from conftest import REPO

ORIGINAL_STYLE_DECODER = '''
class DemaskDecoder:
    """Low-confidence remasking written against the original harness interface."""

    def __init__(self, mask_id, temperature=0.0, conf_threshold=0.9, kl_threshold=0.01, history_length=2):
        self.mask_id = mask_id
        self.temperature = temperature

    @torch.no_grad()
    def decode(self, model, input_ids, gen_length, steps, block_length):
        prompt_len = input_ids.shape[1]
        x = torch.full((input_ids.shape[0], prompt_len + gen_length), self.mask_id, dtype=torch.long,
                       device=model.device)
        x[:, :prompt_len] = input_ids.clone()
        blocks = gen_length // block_length
        used_steps = 0
        for b in range(blocks):
            start, end = prompt_len + b * block_length, prompt_len + (b + 1) * block_length
            schedule = get_num_transfer_tokens(x[:, start:end] == self.mask_id, steps // blocks)
            for i in range(steps // blocks):
                masked = x == self.mask_id
                logits = model(x).logits
                guess = torch.argmax(logits, dim=-1)
                probs = F.softmax(logits.to(torch.float64), dim=-1)
                conf = torch.gather(probs, -1, guess.unsqueeze(-1)).squeeze(-1)
                conf[:, end:] = -np.inf
                conf = torch.where(masked, conf, -np.inf)
                chosen = torch.zeros_like(masked)
                for row in range(conf.shape[0]):
                    _, idx = torch.topk(conf[row], k=int(schedule[row, i]))
                    chosen[row, idx] = True
                x[chosen] = guess[chosen]
                used_steps += 1
        return x, used_steps
'''


def test_bundled_model_loads_fast():
    start = time.time()
    model = cde.load_model(cde.TINY, device="cpu")
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


def test_original_harness_decoder_pasted_into_the_region_runs_unchanged(tmp_path):
    source = open(os.path.join(REPO, "custom_demask_eval.py")).read()
    head, rest = source.split("# --- EDITABLE REGION START ---\n")
    _, tail = rest.split("# --- EDITABLE REGION END ---\n")
    work = tmp_path / "harness"
    work.mkdir()
    (work / "custom_demask_eval.py").write_text(head + "# --- EDITABLE REGION START ---\n" + ORIGINAL_STYLE_DECODER
                                                + "# --- EDITABLE REGION END ---\n" + tail)
    for name in ("utils.py", "decoders.py", "models.py", "report.py", "data", "models"):
        os.symlink(os.path.join(REPO, name), work / name)
    out = run_label(tmp_path / "results", "tiny-math", "--limit", "6", "--batch_size", "1", cwd=str(work),
                    script=str(work / "custom_demask_eval.py"))
    assert "avg_steps_tiny-math: 64.0000" in out and "n_samples_tiny-math: 6.0000" in out
