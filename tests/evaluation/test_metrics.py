"""ROUGE-L and exact match against hand-computed values."""

import pytest

from fedmole.evaluation.metrics import exact_match, normalize_answer, rouge_l, score


def test_rouge_identical_and_disjoint():
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l("red green blue", ["one two three"]) == 0.0


def test_rouge_partial_by_hand():
    # pred: the cat sat on the mat / ref: the cat lay on a mat
    # LCS = "the cat on mat" = 4 tokens; P = R = 4/6 -> F = 2/3
    assert rouge_l("the cat sat on the mat", ["the cat lay on a mat"]) == pytest.approx(200 / 3)
    # pred 2 tokens, ref 6, LCS 2: P = 1, R = 1/3, F = 2PR/(P+R) = 0.5
    assert rouge_l("cat sat", ["the cat sat on the mat"]) == pytest.approx(50.0)


def test_rouge_stems_and_lowercases():
    assert rouge_l("Running Dogs", ["run dog"]) == pytest.approx(100.0)


def test_rouge_max_over_references():
    refs = ["one two three", "the cat lay on a mat", "the cat sat on the mat"]
    assert rouge_l("the cat sat on the mat", refs) == pytest.approx(100.0)
    assert rouge_l("the cat sat on the mat", refs[:2]) == pytest.approx(200 / 3)


def test_rouge_non_ascii_text_scores_zero():
    # rouge-score's tokenizer keeps only [a-z0-9]; this is the standard behaviour.
    assert rouge_l("日本語", ["日本語"]) == 0.0


def test_references_must_be_a_list():
    with pytest.raises(TypeError, match="single str"):
        rouge_l("a", "a")
    with pytest.raises(ValueError, match="empty"):
        exact_match("a", [])


def test_normalize_answer():
    assert normalize_answer("  The  Answer, is: An apple!  ") == "answer is apple"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_exact_match():
    assert exact_match("The Paris.", ["paris"]) == 100.0
    assert exact_match("Paris, France", ["paris"]) == 0.0
    assert exact_match("yes", ["No", "YES!"]) == 100.0


def test_score_means():
    out = score(["the cat sat on the mat", "paris"], [["the cat lay on a mat"], ["Paris"]])
    assert out["n"] == 2
    assert out["rouge_l"] == pytest.approx((200 / 3 + 100) / 2)
    assert out["exact_match"] == pytest.approx(50.0)
    assert score([], []) == {"rouge_l": 0.0, "exact_match": 0.0, "n": 0}
    with pytest.raises(ValueError, match="pair up"):
        score(["a"], [])
