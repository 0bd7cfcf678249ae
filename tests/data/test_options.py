"""The closed-label-set rule that turns a task into classification data."""

from fedmole.data.options import closed_label_set, parse_options, with_closed_options
from fedmole.data.types import Example


def task(answers):
    return [Example("q", f"x{i}", tuple(a) if isinstance(a, tuple) else (a,), task="t") for i, a in enumerate(answers)]


def test_small_closed_sets_qualify_and_free_text_does_not():
    assert closed_label_set(task(["Yes."] * 15 + ["No."] * 5)) == ("No.", "Yes.")
    assert closed_label_set(task(["A", "B", "C"] * 10)) == ("A", "B", "C")
    # multi-reference examples: every reference joins the label set
    assert closed_label_set(task([("A", "E")] + ["A", "B", "C", "D", "E"] * 10)) == ("A", "B", "C", "D", "E")
    assert closed_label_set(task(["Yes."] * 18 + ["No."])) is None  # too few examples to judge
    assert closed_label_set(task(["same"] * 40)) is None  # one label: nothing to choose
    assert closed_label_set(task([f"w{i % 4}" for i in range(39)])) is None  # 4 labels need 40 examples
    assert closed_label_set(task([f"w{i % 4}" for i in range(40)])) is not None
    assert closed_label_set(task([f"w{i % 17}" for i in range(1000)])) is None  # more than 16 labels


def test_with_closed_options_sets_every_example():
    out = with_closed_options(task(["Yes."] * 15 + ["No."] * 5))
    assert {ex.options for ex in out} == {("No.", "Yes.")}
    free = task([f"a{i}" for i in range(30)])
    assert with_closed_options(free) == free


def test_parse_options():
    assert parse_options(None, ["x"]) == ((), None)
    assert parse_options([" yes ", "no"], ["yes"]) == (("yes", "no"), None)
    assert "not among the options" in parse_options(["yes", "no"], ["Yes"])[1]
