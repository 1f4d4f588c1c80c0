"""Scoring generated text against references. Pure Python (no MLX), so every rule is easy to test.

Text metrics
    exact match and contains compare whitespace-normalised text (and case-folded with ignore_case);
    token F1 is SQuAD's: case-folded (with ignore_case), punctuation and the articles a/an/the removed,
    then the bag-of-words overlap of prediction and reference.

Labels (`extract_label`)
    With a pattern, the label is the first group of the *last* match in the text (the whole match when the
    pattern has no group); a model that restates its verdict is judged by its final word.
    With a list of labels only, the label is found in this order:
      1. the last "verdict / label / answer / final answer" marker, then ':' or '=' or '-', then a label
         (e.g. "Verdict: A", "**Final answer:** tie");
      2. otherwise the last standalone occurrence of a label (not part of a longer word).
    With a pattern only, the label is the group's text, stripped (and case-folded with ignore_case).
    With both, the pattern's result must be one of the labels. Labels compare case-insensitively with
    ignore_case and come back spelled as given in the list. Text where no label is found is *unparseable*.

Pairwise judge (`judge_metrics`)
    Each example is asked twice: as given, and with answer A and answer B swapped. Swapping flips the
    reference (A<->B, tie stays tie) and a position-consistent judge flips its verdict the same way.
      accuracy          original order: verdict == reference
      swapped_accuracy  swapped order: verdict == flipped reference
      agreement         both orders correct (the judge is right wherever the answers stand)
      consistency       swapped verdict == flipped original verdict (an unparseable one never counts)
      bias              share of each verdict over both orders, predicted vs reference. Over both orders the
                        reference has as many A as B, so predicted A minus predicted B is position bias.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from lorakit.engine.data.verdicts import VERDICTS, swap_verdict

UNPARSEABLE = "unparseable"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_MARKER = r"\b(?:final\s+answer|verdict|label|answer)\W{0,3}\s*[:=\-]\s*\W{0,3}"


def normalize(text: str, ignore_case: bool = True) -> str:
    """Collapse runs of whitespace to one space, strip the ends, and case-fold with ignore_case."""
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


def exact_match(prediction: str, reference: str, ignore_case: bool = True) -> bool:
    return normalize(prediction, ignore_case) == normalize(reference, ignore_case)


def contains(prediction: str, reference: str, ignore_case: bool = True) -> bool:
    """The normalised reference occurs in the normalised prediction."""
    return normalize(reference, ignore_case) in normalize(prediction, ignore_case)


def f1_tokens(text: str, ignore_case: bool = True) -> list[str]:
    """SQuAD's answer normalisation, split into words."""
    if ignore_case:
        text = text.casefold()
    text = text.translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return text.split()


def token_f1(prediction: str, reference: str, ignore_case: bool = True) -> float:
    """SQuAD token F1 between a prediction and one reference (1.0 when both are empty after normalising)."""
    pred, ref = f1_tokens(prediction, ignore_case), f1_tokens(reference, ignore_case)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_scores(prediction: str, reference: str, ignore_case: bool = True) -> dict[str, float | bool]:
    return {
        "exact_match": exact_match(prediction, reference, ignore_case),
        "contains": contains(prediction, reference, ignore_case),
        "f1": token_f1(prediction, reference, ignore_case),
    }


def text_metrics(scores: Sequence[dict[str, float | bool]]) -> dict[str, float]:
    """Means of the per-example text scores."""
    n = len(scores)
    return {key: (sum(float(s[key]) for s in scores) / n if n else 0.0) for key in ("exact_match", "contains", "f1")}


class LabelExtractor:
    """Finds a label in text by a regex (`pattern`), a list of allowed `labels`, or both (see module doc)."""

    def __init__(self, pattern: str | None = None, labels: Sequence[str] = (), ignore_case: bool = True) -> None:
        if pattern is None and not labels:
            raise ValueError("give a pattern, labels, or both")
        flags = re.IGNORECASE if ignore_case else 0
        self.pattern = re.compile(pattern, flags | re.MULTILINE) if pattern is not None else None
        self.labels = list(labels)
        self.ignore_case = ignore_case
        self._canonical = {self._key(label): label for label in self.labels}
        if self.labels:
            # longest first, so "tie" is not cut short by a label that is its prefix
            alternatives = "|".join(re.escape(label) for label in sorted(self.labels, key=len, reverse=True))
            word = rf"(?<!\w)({alternatives})(?!\w)"
            self._marker = re.compile(_MARKER + word, flags)
            self._word = re.compile(word, flags)

    def _key(self, label: str) -> str:
        label = label.strip()
        return label.casefold() if self.ignore_case else label

    def __call__(self, text: str) -> str | None:
        """The label found in `text`, or None when it is unparseable."""
        if self.pattern is not None:
            matches = list(self.pattern.finditer(text))
            if not matches:
                return None
            last = matches[-1]
            found = last.group(1) if self.pattern.groups else last.group(0)
            if found is None:
                return None
            if not self.labels:
                return self._key(found)
            return self._canonical.get(self._key(found))
        for regex in (self._marker, self._word):
            matches = list(regex.finditer(text))
            if matches:
                return self._canonical[self._key(matches[-1].group(1))]
        return None


def label_metrics(references: Sequence[str | None], predictions: Sequence[str | None],
                  labels: Sequence[str] = ()) -> dict:
    """Accuracy, confusion matrix and unparseable count over examples whose reference has a label.

    An unparseable prediction (None) counts as wrong and lands in the confusion matrix's "unparseable" column.
    The matrix has a row and a column for each of `labels` plus every label seen (confusion[reference][predicted]).
    """
    pairs = [(ref, pred) for ref, pred in zip(references, predictions, strict=True) if ref is not None]
    seen = {ref for ref, _ in pairs} | {pred for _, pred in pairs if pred is not None}
    labels = [*labels, *sorted(seen - set(labels))]
    confusion = {ref: {pred: 0 for pred in [*labels, UNPARSEABLE]} for ref in labels}
    for ref, pred in pairs:
        confusion[ref][pred if pred is not None else UNPARSEABLE] += 1
    correct = sum(ref == pred for ref, pred in pairs)
    return {
        "accuracy": correct / len(pairs) if pairs else 0.0,
        "correct": correct,
        "labelled": len(pairs),
        "unlabelled_references": len(references) - len(pairs),
        "unparseable": sum(pred is None for _, pred in pairs),
        "labels": labels,
        "confusion": confusion,
    }


def judge_metrics(references: Sequence[str], original: Sequence[str | None], swapped: Sequence[str | None]) -> dict:
    """Pairwise-judge metrics (see module doc). Verdicts are "A", "B", "tie" or None (unparseable);
    `swapped[i]` is the verdict for example i asked with its answers swapped."""
    n = len(references)
    if not (len(original) == len(swapped) == n):
        raise ValueError("references, original and swapped verdicts must have the same length")
    flipped_refs = [swap_verdict(r) for r in references]
    right = [o == r for o, r in zip(original, references)]
    right_swapped = [s == r for s, r in zip(swapped, flipped_refs)]
    consistent = [o is not None and s == swap_verdict(o) for o, s in zip(original, swapped)]

    def share(values: Sequence[object]) -> float:
        return sum(map(bool, values)) / n if n else 0.0

    predicted = Counter(v if v is not None else UNPARSEABLE for v in [*original, *swapped])
    reference = Counter([*references, *flipped_refs])
    total = 2 * n
    bias = {}
    for verdict in [*VERDICTS, UNPARSEABLE]:
        pred_share = predicted[verdict] / total if total else 0.0
        ref_share = reference[verdict] / total if total else 0.0
        bias[verdict] = {"predicted": pred_share, "reference": ref_share, "difference": pred_share - ref_share}
    return {
        "examples": n,
        "accuracy": share(right),
        "swapped_accuracy": share(right_swapped),
        "agreement": share([a and b for a, b in zip(right, right_swapped)]),
        "consistency": share(consistent),
        "unparseable": sum(v is None for v in original),
        "unparseable_swapped": sum(v is None for v in swapped),
        "position_bias": bias["A"]["predicted"] - bias["B"]["predicted"],
        "bias": bias,
        "confusion": label_metrics(references, original, VERDICTS)["confusion"],
        "confusion_swapped": label_metrics(flipped_refs, swapped, VERDICTS)["confusion"],
    }
