"""Grader: the last complete \\boxed{}, math-verify equivalence, string fallback, no box is wrong."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_opsd.eval.grader import Grade, answers_match, extract_boxed, grade, normalize


@pytest.mark.parametrize("response, reference", [
    (r"so \boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\frac{3}{4}}", "0.75"),
    (r"\boxed{\dfrac12}", "1/2"),
    (r"\boxed{50\%}", "0.5"),
    (r"\boxed{20.0}", "20"),
    (r"\boxed{1,000}", "1000"),
])
def test_fractions_decimals_and_percent_are_equivalent(response, reference):
    assert grade(response, reference).correct


def test_close_but_unequal_numbers_are_wrong():
    assert not grade(r"\boxed{0.333}", r"\frac{1}{3}").correct
    assert not grade(r"\boxed{21}", "20").correct
    assert not grade(r"\boxed{3.14159}", r"\pi").correct


def test_nested_braces():
    response = r"Thus $x = \boxed{\frac{1}{\sqrt{2}}}$."
    assert extract_boxed(response) == r"\frac{1}{\sqrt{2}}"
    assert grade(response, r"\frac{\sqrt{2}}{2}").correct
    assert extract_boxed(r"\boxed {a^{b^{c}}}") == "a^{b^{c}}"


def test_escaped_braces_do_not_count_as_nesting():
    assert extract_boxed(r"\boxed{\{1, 2\}} rest") == r"\{1, 2\}"
    assert grade(r"\boxed{\{1,2\}}", r"\{2, 1\}").correct
    assert extract_boxed(r"\boxed{\left\{ x \right.}") == r"\left\{ x \right."


def test_last_box_wins():
    response = r"First guess \boxed{3}. Wait, that is wrong: the answer is \boxed{4}."
    assert grade(response, "4") == Grade("4", True)
    assert grade(response, "3") == Grade("4", False)


def test_an_unclosed_box_does_not_count():
    truncated = r"\boxed{4} ... let me double check, the answer is \boxed{5"
    assert grade(truncated, "4") == Grade("4", True)
    assert grade(r"answer: \boxed{5", "5") == Grade(None, False)


@pytest.mark.parametrize("response", ["The answer is 20.", "20", r"$20$", r"\fbox{20}", r"\boxed{}"])
def test_no_box_or_empty_box_is_wrong(response):
    assert not grade(response, "20").correct


@pytest.mark.parametrize("response, reference", [
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),                # bare LaTeX gold: parsed only once wrapped in $...$
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2"),
    (r"\boxed{2\sqrt{3}}", r"$\sqrt{12}$"),           # gold with its own delimiters
    (r"\boxed{(1, 2)}", r"\left(1,2\right)"),
    (r"\boxed{x = 3}", "3"),
    (r"\boxed{10^\circ}", "10"),
    (r"\boxed{\text{(B)}}", "(B)"),                   # not math: equal after string normalization
    (r"\boxed{\text{Monday}}", r"\text{monday}"),
])
def test_latex_answers(response, reference):
    assert grade(response, reference).correct


@pytest.mark.parametrize("response, reference", [
    (r"\boxed{x^2+2x}", "(x+1)^2"),
    (r"\boxed{(1, 3)}", "(1, 2)"),
    (r"\boxed{\text{(C)}}", "(B)"),
])
def test_wrong_latex_answers(response, reference):
    assert not grade(response, reference).correct


def test_normalize():
    assert normalize(r" $\dfrac{1}{2}$. ") == r"\frac{1}{2}"
    assert normalize(r"\text{Yes}") == normalize("yes") == "yes"
    assert normalize(r"\left( 1,\, 2 \right)") == "(1,2)"


def test_answers_match_is_string_equal_for_unparseable_answers():
    assert answers_match("foo bar", r"\text{foo bar}")
    assert not answers_match("foo", "bar")


_balanced = st.recursive(
    st.text(alphabet="abx12+-^_ ", max_size=4),
    lambda inner: st.lists(inner, max_size=3).map(lambda parts: "{" + "".join(parts) + "}"),
    max_leaves=8,
)


@settings(deadline=None)
@given(prefix=st.text(alphabet="abc {}$.", max_size=10), content=st.lists(_balanced, max_size=3).map("".join))
def test_extract_boxed_returns_the_whole_balanced_content(prefix, content):
    assert extract_boxed(prefix + r"\boxed{" + content + "} done") == content.strip()
