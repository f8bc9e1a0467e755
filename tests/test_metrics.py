"""Answer scores on strings whose values are worked out by hand."""

from __future__ import annotations

import pytest

from vlm_core.metrics import anls, exact_match, levenshtein, normalize_answer, score, token_f1


@pytest.mark.parametrize(("raw", "normal"), [
    ("Red.", "red"), ("  Yes! ", "yes"), ("a  big\tred\nball", "a big red ball"), ("What?!..", "what"),
    ("red .", "red"), ("3.5", "3.5"), ("", ""), ("...", ""), ("U.S.A.", "u.s.a"), ("red, blue", "red, blue"),
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match():
    assert exact_match("Red.", "red") == 1.0
    assert exact_match("  YES!  ", "yes") == 1.0
    assert exact_match("red ball", "red") == 0.0
    assert exact_match("blue", ["red", "Blue."]) == 1.0  # any reference
    assert exact_match("", "") == 1.0 and exact_match("", "red") == 0.0


def test_token_f1_by_hand():
    assert token_f1("the red ball", "red ball") == pytest.approx(0.8)  # p 2/3, r 1, F1 = 2·(2/3)/(5/3)
    assert token_f1("red red", "red") == pytest.approx(2 / 3)  # counts clip: common 1, p 1/2, r 1
    assert token_f1("Red.", "red") == 1.0
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "red") == 0.0 and token_f1("red", "") == 0.0
    assert token_f1("a b", ["c", "b a"]) == 1.0  # the best reference


def test_levenshtein_by_hand():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("", "") == 0
    assert levenshtein("flaw", "lawn") == 2


def test_anls_by_hand():
    assert anls("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert anls("  Hello   World ", "hello world") == 1.0  # case and spacing do not count
    assert anls("helo", "hello") == pytest.approx(0.8)


def test_anls_threshold_boundary():
    # "abcd" vs "abxy": 2 edits over 4 = NL 0.5: not below the threshold, so 0
    assert anls("abcd", "abxy") == 0.0
    assert anls("abcd", "abxy", threshold=0.51) == pytest.approx(0.5)
    # "abcd" vs "abcx": NL 0.25 < 0.5
    assert anls("abcd", "abcx") == pytest.approx(0.75)
    assert anls("abcd", "abcx", threshold=0.25) == 0.0


def test_anls_references_and_empty_strings():
    assert anls("paris", ["london", "Paris"]) == 1.0
    assert anls("pari", ["london", "paris"]) == pytest.approx(0.8)  # max over references
    assert anls("", "") == 1.0
    assert anls("", "x") == 0.0 and anls("x", "") == 0.0
    assert anls("   ", "") == 1.0  # only whitespace is empty


def test_score_overall_and_per_dataset():
    rows = [
        {"dataset": "shapes", "prediction": "Red.", "reference": "red"},
        {"dataset": "shapes", "prediction": "the red ball", "reference": "red ball"},
        {"dataset": "docs", "prediction": "helo", "reference": "hello"},
    ]
    out = score(rows)  # ANLS keeps punctuation: "red." vs "red" is 1 edit in 4, "the red ball" 4 in 12
    assert out["datasets"]["shapes"] == {"count": 2, "exact_match": 0.5, "f1": pytest.approx(0.9),
                                         "anls": pytest.approx((0.75 + 2 / 3) / 2)}
    assert out["datasets"]["docs"] == {"count": 1, "exact_match": 0.0, "f1": 0.0, "anls": pytest.approx(0.8)}
    assert out["overall"]["count"] == 3
    assert out["overall"]["exact_match"] == pytest.approx(1 / 3)
    assert out["overall"]["f1"] == pytest.approx(1.8 / 3)
    assert out["overall"]["anls"] == pytest.approx((0.75 + 2 / 3 + 0.8) / 3)
    assert score([]) == {"overall": {"count": 0, "exact_match": 0.0, "f1": 0.0, "anls": 0.0}, "datasets": {}}
