"""benchmarks/suite/hops.py's arithmetic: each request's span is cut at the marks inside it, in
time order, the first of each name only."""

from __future__ import annotations

from benchmarks.suite.hops import CLIENT_READ, CLIENT_SENT, steps


def test_each_request_is_cut_at_the_marks_inside_its_span() -> None:
    marks = [(1.001, "a"), (1.003, "b"), (1.0035, "b"), (2.002, "a"), (2.006, "b"), (9.0, "a")]
    found = steps(marks, [(1.0, 1.004), (2.0, 2.010)])
    rounded = {step: [round(value, 6) for value in values] for step, values in found.items()}
    assert rounded[f"{CLIENT_SENT}  ->  a"] == [1.0, 2.0]
    assert rounded["a  ->  b"] == [2.0, 4.0]
    assert rounded[f"b  ->  {CLIENT_READ}"] == [1.0, 4.0]
    assert rounded["the whole request"] == [4.0, 10.0]
