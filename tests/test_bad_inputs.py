"""The bad-input table (bench/bad_inputs.py), the cases that need no model: each runs the real `llavamed`.

Target of every case: exit 2 with one line `llavamed CMD: error: ...` naming the input (FILE, line N or record
id), or the case's documented outcome (validate's report, a rerun that keeps its output); no traceback; an
earlier good output in `--out` byte-identical afterwards. The cases still failing are marked xfail(strict)
with what the table found, so each mark flips when its command is fixed.
"""
import sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bad_inputs as table  # noqa: E402

KNOWN: dict[str, str] = {}  # case id -> what the table still gets wrong (strict xfail, so a fix flips it)
CASES = table.all_cases(model=False)


def param(case):
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN[case.id])] if case.id in KNOWN else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    fx = table.Fixtures(tmp_path_factory.mktemp("bad_inputs"))
    yield fx
    fx.close()


def test_known_failures_are_cases():
    assert set(KNOWN) <= {c.id for c in CASES}


@pytest.mark.parametrize("case", [param(c) for c in CASES])
def test_bad_input(case, fixtures, tmp_path):
    run = table.run_case(case, fixtures, tmp_path, timeout=120)
    assert run.cls in ("clear", "ok"), f"{run.case}: {run.cls} (exit {run.rc}) {run.note}; {run.first_line}"


def test_classify_a_traceback_and_a_clobbered_output():
    case = table.Case("score", "x", build=None, names=("pred.jsonl",))
    assert table.classify(case, 1, "", "Traceback (most recent call last):\n  ...", [], "")[0] == "traceback"
    changed = ["out/score.json"]
    assert table.classify(case, 2, "", "llavamed score: error: pred.jsonl: bad", changed, "")[0] == "clobbered"
    assert table.classify(case, 0, "", "", [], "") == ("silent", "exit 0 on bad input")
    assert table.classify(case, 2, "", "llavamed score: error: pred.jsonl: line 3 bad", [], "") == ("clear", "")
    assert table.classify(case, 2, "", "llavamed score: error: a file is bad", [], "")[0] == "unclear"
    assert table.classify(case, 2, "", "warning\nllavamed score: error: pred.jsonl", [], "")[0] == "unclear"
