"""Benchmark: worst-case wall-clock times of the response parser and the answer matcher on the
adversarial inputs of tests/test_data.py, against the tight limits the tests used to assert.

The tests bound CPU time loosely (they must pass on a loaded shared machine, and only need to catch
blow-ups of minutes); this script holds the tight, wall-clock limits: run it on an idle machine
after touching data.py or answers.py.
    python bench/parse_times.py              # about 10 s; exit 1 if a limit is exceeded
    python bench/parse_times.py --random 2000
"""
import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

# seconds: the limits tests/test_data.py asserted in wall-clock time before they moved here
LIMITS = {"parse 1 MB": 1.0, "pathological answers (pair)": 2.0, "random maths": 2.0, "parse": 0.5}


def worst(label, calls):
    """(label, worst seconds, its input) over calls: a list of (description, function of no
    arguments)."""
    top = (0.0, "")
    for what, fn in calls:
        start = time.perf_counter()
        fn()
        top = max(top, (time.perf_counter() - start, what))
    return label, top[0], top[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=500, help="random maths strings to time")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import test_data as T  # the inputs, from the tests themselves
    from data import answers_match, parse_response, split_segments

    answers_match("\\sqrt{4}", "2")  # the one-time sympy import is not a call's time
    rng = random.Random(args.seed)
    def mathy(longest):
        return "".join(rng.choices(T.MATHY_TOKENS, k=rng.randint(1, longest)))
    maths = [(mathy(25), mathy(12)) for _ in range(args.random)]
    pairs = [(bad, truth) for bad in T.PATHOLOGICAL for truth in ["3", "10", bad]]
    rows = [
        worst("parse 1 MB", [(text[:30], lambda t=text: (parse_response(t), split_segments(t)))
                             for text in T.ADVERSARIAL]),
        worst("pathological answers (pair)",
              [(f"{b[:20]} vs {t[:20]}", lambda b=b, t=t: (answers_match(b, t),
                                                          answers_match(t, b))) for b, t in pairs]),
        worst("random maths", [(f"{p[:20]} vs {t[:20]}", lambda p=p, t=t: answers_match(p, t))
                               for p, t in maths]),
        worst("parse", [(p[:30], lambda p=p, t=t: parse_response(
            f"<caption>{p}</caption><think>{t}</think><answer>{p}</answer>")) for p, t in maths]),
    ]
    print("| check | worst s | limit s | input |\n|---|---|---|---|")
    over = 0
    for label, seconds, what in rows:
        over += seconds >= LIMITS[label]
        print(f"| {label} | {seconds:.4f} | {LIMITS[label]} | {what!r} |")
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
