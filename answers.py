"""Is this answer the same as that one? The answer matcher behind data.reward.

Fast path: our own normalisation and exact Fraction arithmetic (never `eval`); slow path:
math_verify, only for strings that look like maths and pass guards that keep sympy bounded in time.
Split out of data.py because it is long and self-contained; read it only when an answer is scored
in a way you did not expect.
"""
import logging
import re
from fractions import Fraction

# Our own matcher decides the common cases (numbers, letters, yes/no, plain strings) exactly and
# fast. Only what it cannot decide and looks like maths goes to math_verify (sympy), and only after
# guards, because sympy can run for minutes (nested braces, 10^{10^{10}}, 100!!).

MAX_ANSWER_CHARS = 1024  # docs/algorithms.md#response-format-and-reward: an answer of 1024+ characters counts as wrong
# Spellings that mean the same. Order matters: "\\$" before "$", "^\\circ" before "\\circ".
_REPLACEMENTS = [("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\(", ""), ("\\)", ""),
                 ("\\[", ""), ("\\]", ""), ("\\!", ""), ("\\,", " "), ("\\;", " "),
                 ("\\ ", " "), ("~", " "), ("\\$", ""), ("$", ""), ("\\%", "%"),
                 ("^{\\circ}", "°"), ("^\\circ", "°"), ("\\circ", "°"), ("\\degree", "°"),
                 ("\u2212", "-"), ("\\displaystyle", "")]
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?(?:correct\s+)?answer\s*(?:is\b)?\s*:?\s*",
                            re.IGNORECASE)
# An option letter alone, or followed by ".", ")" or ":" and then anything ("b. 12"): a bare
# "a triangle" is not option a.
_CHOICE = re.compile(r"(?:option|choice)?\s*(?:\(([a-z])\)|([a-z])(?=[.):]|$))[.):]?(?:\s.*)?",
                     re.DOTALL)
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:e[+-]?\d{1,3})?|\.\d+(?:e[+-]?\d{1,3})?"
_NUMBER = re.compile(rf"([+-]?)\s*({_NUM})(?:\s*/\s*({_NUM}))?(\s*)(.*)", re.DOTALL)
_SIMPLE_FRAC = re.compile(r"\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
# What may follow a number and be ignored: %, a degree sign, unit words ("cm^2", "km/h", "apples").
# Each word must end in whitespace or the end: with an optional separator, (word\s*)* would try
# every way of cutting "aaaa...a1" into words, which is exponential.
_UNIT = re.compile(r"(?:[°%]\s*)?(?:[a-z]+(?:\^?[23²³])?(?:/[a-z]+)?(?:\s+|$))*")
# Only strings with digits, LaTeX or operators are worth sympy's time ("cat" vs "dog" is just no).
_MATHY = re.compile(r"[\d\\^_=+\-*/()]")
# math_verify guards: no factorials, sums or integrals, no number of 16+ digits, at most two
# exponents and each one a 1-2 digit integer or a single letter (so no towers), length <= 128 and
# brackets nested at most 4 deep (the LaTeX parser is exponential in brace depth: 18 take ~1 min).
_MV_BANNED = re.compile(r"!|\*\*|\d{16}|\\(?:sum|prod|int|lim|binom|choose)")
_MV_EXPONENT = re.compile(
    r"\^\s*(?:\{\s*[+-]?(?:\d{1,2}|[a-zA-Z])\s*\}|[+-]?\d{1,2}(?!\d)|[a-zA-Z])")


def _clean(s):
    """Strip the wrapping of an answer: \\boxed{}, $ $, \\text{}, "The answer is", spacing macros,
    degree and percent spellings, a trailing period. Case is kept (LaTeX needs it)."""
    s = str(s).strip()
    i = s.rfind("\\boxed{")  # the last box holds the final answer
    if i >= 0:
        depth, j = 1, i + len("\\boxed{")
        while j < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            j += 1
        s = s[i + len("\\boxed{") : j - 1] if depth == 0 else s
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = _ANSWER_PREFIX.sub("", _LEFT_RIGHT.sub("", _TEXT_CMD.sub(r"\1", s)))
    # markdown bold or code around the answer ("**B**.") and a closing period are not the answer
    return " ".join(s.split()).strip(" *`").rstrip(" .").strip(" *`")


def _number(s):
    """Exact value of a lower-cased answer that is one number with an optional unit, else None.
    "3", "+3", "3.0", "1,000", "1/2", "\\frac12", "45°", "3 cm" -> Fractions; "3x", "2 pi" -> None.
    Fraction() on a regex-checked string never evals anything; the 400-character cap keeps Python's
    int-conversion limit (4300 digits) and big-number arithmetic out of reach."""
    s = _SIMPLE_FRAC.sub(lambda m: f"{m[1] or m[2]}/{m[3] or m[4]}", s)
    m = _NUMBER.fullmatch(s) if len(s) <= 400 else None
    if m is None:
        return None
    sign, num, den, gap, unit = m.groups()
    words = unit.replace("/", " ").split()
    if not _UNIT.fullmatch(unit) or (unit and unit[0].isalpha() and not gap and len(words[0]) == 1):
        return None  # "3x" is an expression, not 3 with a unit
    if any(w in ("pi", "i", "e", "sqrt") for w in words):
        return None
    value = Fraction(num.replace(",", ""))
    if den is not None:
        if Fraction(den.replace(",", "")) == 0:
            return None
        value /= Fraction(den.replace(",", ""))
    return -value if sign == "-" else value


def _choice(s):
    """The option letter of a lower-cased answer ("b", "(b)", "b. 12", "option b"), or None."""
    m = _CHOICE.fullmatch(s)
    return (m[1] or m[2]) if m else None


def _safe_for_math_verify(s):
    """The guards above: True if sympy can be trusted to finish on s in well under a second."""
    depth = deepest = 0
    for ch in s[:129]:
        depth += 1 if ch in "({[" else -1 if ch in ")}]" else 0
        deepest = max(deepest, depth)
    return (len(s) <= 128 and deepest <= 4 and not _MV_BANNED.search(s)
            and s.count("^") <= 2 and len(_MV_EXPONENT.findall(s)) == s.count("^"))


def _math_verify_match(pred, truth):
    """math_verify 0.9's parse() and verify() time out with signal.alarm by default. That raises
    ValueError outside the main thread (reward workers, DataLoader threads) and in the main thread
    it cancels any alarm the caller set. So we always pass parsing_timeout=None /
    timeout_seconds=None and rely on _safe_for_math_verify to keep inputs small. Its timeout
    exception derives from BaseException, hence the explicit except."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # hush "timeout is disabled" warnings
    try:
        gold = parse(f"${truth}$", parsing_timeout=None)
        guess = parse(f"${pred}$", parsing_timeout=None)
        return bool(gold and guess and verify(gold, guess, timeout_seconds=None))
    except (Exception, TimeoutException):
        return False


def answers_match(pred, truth):
    """Is the predicted answer equal to the ground truth (a str, or a list of equivalent answers)?
    Order: exact after normalisation -> option letter (if the truth is one) -> yes/no (if the truth
    is one) -> exact numeric value with units ignored -> math_verify for what looks like maths.
    Decimals must equal the truth exactly ("0.33" is not "1/3"), and units are ignored rather than
    compared ("3 apples" matches "3 pears"): the ground truths we train on are bare numbers."""
    if isinstance(truth, (list, tuple)):
        return any(answers_match(pred, t) for t in truth)
    pred = "" if pred is None else str(pred)
    if not pred.strip() or len(pred) >= MAX_ANSWER_CHARS:
        return False
    p_raw, t_raw = _clean(pred), _clean(truth)
    p, t = p_raw.lower(), t_raw.lower()
    if not p or not t:
        return False
    if p == t:
        return True
    if _choice(t):
        return _choice(p) == _choice(t)
    if t in ("yes", "no"):
        return re.match(r"[a-z]*", p).group() == t  # "Yes, because ..." counts as "yes"
    p_num, t_num = _number(p), _number(t)
    if p_num is not None and t_num is not None:
        return p_num == t_num
    if (_MATHY.search(p) and _MATHY.search(t)
            and _safe_for_math_verify(p_raw) and _safe_for_math_verify(t_raw)):
        return _math_verify_match(p_raw, t_raw)
    return False
