"""Every metric pinned on hand-made predictions (no model)."""

import pytest

from lorakit.engine.data.verdicts import parse_verdict, swap_verdict
from lorakit.engine.scoring.metrics import (
    LabelExtractor,
    contains,
    exact_match,
    judge_metrics,
    label_metrics,
    normalize,
    text_metrics,
    text_scores,
    token_f1,
)


def test_normalize_collapses_whitespace_and_case():
    assert normalize("  Paris \n\t is  BIG ") == "paris is big"
    assert normalize("  Paris \n is ", ignore_case=False) == "Paris is"


def test_exact_match_and_contains():
    assert exact_match("The capital is  Paris.\n", "the capital is paris.")
    assert not exact_match("The capital is Paris.", "the capital is paris.", ignore_case=False)
    assert not exact_match("Paris", "Paris.")
    assert contains("I think the answer is   PARIS, France", "paris, france")
    assert not contains("Paris", "Paris, France")
    assert not contains("I think PARIS", "Paris", ignore_case=False)


def test_token_f1_squad_style():
    assert token_f1("The Paris!", "paris") == 1.0  # articles, punctuation and case dropped
    # pred: [capital, is, paris], ref: [paris, france]: overlap 1, P=1/3, R=1/2 -> F1 = 0.4
    assert token_f1("the capital is Paris", "Paris, France") == pytest.approx(0.4)
    assert token_f1("berlin", "paris") == 0.0
    assert token_f1("a the", "") == 1.0  # both empty after normalising
    assert token_f1("paris", "") == 0.0
    # repeated words count once per occurrence in both
    assert token_f1("yes yes yes", "yes") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("Paris", "paris", ignore_case=False) == 0.0


def test_text_scores_and_means():
    scores = [text_scores("Paris", "paris"), text_scores("It is Paris", "Paris"), text_scores("Rome", "Paris")]
    assert scores[0] == {"exact_match": True, "contains": True, "f1": 1.0}
    assert scores[1]["exact_match"] is False and scores[1]["contains"] is True
    means = text_metrics(scores)
    assert means["exact_match"] == pytest.approx(1 / 3)
    assert means["contains"] == pytest.approx(2 / 3)
    assert means["f1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # "it is paris" vs "paris": P=1/3,R=1 -> 0.5
    assert text_metrics([]) == {"exact_match": 0.0, "contains": 0.0, "f1": 0.0}


def test_labels_prefer_the_last_verdict_marker():
    extract = LabelExtractor(labels=["A", "B", "tie"])
    assert extract("Answer A is longer, but B cites the manual.\nVerdict: B") == "B"
    assert extract("Verdict: A ... on reflection, Verdict: tie") == "tie"
    assert extract("**Final answer:** tie") == "tie"
    assert extract("verdict = b") == "B"  # case-folded, returned as spelled in --labels
    # no marker: the last standalone label; "B" inside "Bob" or "AB" is not standalone
    assert extract("Bob prefers AB. I pick B") == "B"
    assert extract("Both are fine, tie.") == "tie"
    assert extract("No idea.") is None
    assert extract("") is None


def test_labels_case_sensitive():
    extract = LabelExtractor(labels=["A", "B", "tie"], ignore_case=False)
    assert extract("a good answer, verdict: B") == "B"
    assert extract("a good answer") is None
    assert extract("Verdict: TIE") is None


def test_label_pattern_first_group_of_last_match():
    extract = LabelExtractor(pattern=r"Label:\s*(\w+)")
    assert extract("Label: spam\nLabel: ham") == "ham"
    assert extract("no label here") is None
    assert extract("Label: SPAM") == "spam"  # case-folded with ignore_case
    assert LabelExtractor(pattern=r"Label:\s*(\w+)", ignore_case=False)("Label: SPAM") == "SPAM"
    whole = LabelExtractor(pattern=r"\b(?:yes|no)\b")  # no group: the whole match
    assert whole("Yes, well... no.") == "no"
    # with labels too, the pattern's result must be one of them (case-folded to its spelling)
    both = LabelExtractor(pattern=r"class=(\w+)", labels=["Positive", "Negative"])
    assert both("class=positive") == "Positive"
    assert both("class=neutral") is None
    optional = LabelExtractor(pattern=r"x(y)?")
    assert optional("x") is None  # the group did not take part in the match


def test_label_extractor_needs_something():
    with pytest.raises(ValueError):
        LabelExtractor()


def test_label_metrics_confusion_and_unparseable():
    refs = ["pos", "pos", "neg", "neg", None]
    preds = ["pos", None, "pos", "neg", "neg"]
    m = label_metrics(refs, preds, labels=["pos", "neg"])
    assert m["labels"] == ["pos", "neg"]
    assert m["labelled"] == 4 and m["unlabelled_references"] == 1
    assert m["correct"] == 2 and m["accuracy"] == 0.5
    assert m["unparseable"] == 1
    assert m["confusion"] == {
        "pos": {"pos": 1, "neg": 0, "unparseable": 1},
        "neg": {"pos": 1, "neg": 1, "unparseable": 0},
    }
    # a predicted label outside the list still gets its column
    assert "maybe" in label_metrics(["pos"], ["maybe"], labels=["pos"])["confusion"]["pos"]


def test_swap_rules():
    assert swap_verdict("A") == "B" and swap_verdict("B") == "A"
    assert swap_verdict("tie") == "tie" and swap_verdict(None) is None
    assert parse_verdict(" a ") == "A" and parse_verdict("TIE") == "tie"
    assert parse_verdict("C") is None and parse_verdict(None) is None


def test_judge_metrics_pinned():
    refs = ["A", "B", "tie", "A"]
    original = ["A", "B", "tie", None]  # 3 of 4 right, one unparseable
    swapped = ["B", "B", "tie", "B"]  # flipped refs: B, A, tie, B -> examples 0, 2, 3 right
    m = judge_metrics(refs, original, swapped)
    assert m["examples"] == 4
    assert m["accuracy"] == 0.75
    assert m["swapped_accuracy"] == 0.75
    assert m["agreement"] == 0.5  # examples 0 and 2 right in both orders
    # example 0 flips A->B (consistent), 1 keeps B (position-driven), 2 keeps tie (consistent),
    # 3 is unparseable in the original order (never consistent)
    assert m["consistency"] == 0.5
    assert m["unparseable"] == 1 and m["unparseable_swapped"] == 0
    # predicted over both orders (A, B, tie, None + B, B, tie, B): A 1, B 4, tie 2, unparseable 1
    bias = m["bias"]
    assert bias["A"]["predicted"] == pytest.approx(1 / 8)
    assert bias["B"]["predicted"] == pytest.approx(4 / 8)
    assert bias["tie"]["predicted"] == pytest.approx(2 / 8)
    assert bias["unparseable"]["predicted"] == pytest.approx(1 / 8)
    # reference over both orders: A, B, tie, A + B, A, tie, B -> A 3, B 3, tie 2
    assert bias["A"]["reference"] == bias["B"]["reference"] == pytest.approx(3 / 8)
    assert bias["B"]["difference"] == pytest.approx(4 / 8 - 3 / 8)
    assert m["position_bias"] == pytest.approx(1 / 8 - 4 / 8)
    assert m["confusion"]["A"] == {"A": 1, "B": 0, "tie": 0, "unparseable": 1}
    assert m["confusion_swapped"]["A"] == {"A": 0, "B": 1, "tie": 0, "unparseable": 0}


def test_a_judge_that_always_says_A_is_inconsistent_and_biased():
    refs = ["A", "B", "tie", "A", "B", "tie"]
    m = judge_metrics(refs, ["A"] * 6, ["A"] * 6)
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["swapped_accuracy"] == pytest.approx(2 / 6)  # flipped refs B, A, tie, B, A, tie
    assert m["agreement"] == 0.0
    assert m["consistency"] == 0.0
    assert m["position_bias"] == 1.0


def test_a_perfect_judge():
    refs = ["A", "B", "tie"]
    m = judge_metrics(refs, refs, [swap_verdict(r) for r in refs])
    assert m["accuracy"] == m["swapped_accuracy"] == m["agreement"] == m["consistency"] == 1.0
    assert m["position_bias"] == 0.0
    assert all(abs(v["difference"]) < 1e-12 for v in m["bias"].values())


def test_judge_metrics_lengths_must_match():
    with pytest.raises(ValueError):
        judge_metrics(["A"], ["A"], [])
