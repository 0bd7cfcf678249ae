"""Per-example metrics: ROUGE-L F (rouge-score, stemmed, x100), exact match,
and accuracy for examples with answer options.

Each takes one prediction and every reference answer of an example and keeps
the best match, the usual protocol for Natural Instructions style data.
Accuracy is exact match under another name: it is reported only for examples
whose prediction was chosen among options, where it is the classification
accuracy.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from statistics import fmean

from rouge_score import rouge_scorer

_SCORER: rouge_scorer.RougeScorer | None = None
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _scorer() -> rouge_scorer.RougeScorer:
    # Built once: the Porter stemmer and tokenizer set-up are not free, and
    # evaluation calls this thousands of times per round.
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, got a single str; wrap it in a list")
    if len(references) == 0:
        raise ValueError("references is empty; an example needs at least one reference answer")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure x100 of `prediction`, max over `references`.

    Uses rouge-score's default tokenizer (lowercase, ASCII alphanumerics
    only), so text with no such characters scores 0 against anything.
    """
    _check_references(references)
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100.0 if the normalised prediction equals any normalised reference, else 0.0."""
    _check_references(references)
    pred = normalize_answer(prediction)
    return 100.0 if any(pred == normalize_answer(ref) for ref in references) else 0.0


def example_scores(prediction: str, references: Sequence[str], has_options: bool) -> dict[str, float]:
    """{"rouge_l", "exact_match"} of one prediction, plus "accuracy" when it was chosen among options."""
    out = {"rouge_l": rouge_l(prediction, references), "exact_match": exact_match(prediction, references)}
    if has_options:
        out["accuracy"] = out["exact_match"]
    return out


def score(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Mean ROUGE-L and exact match over examples.

    Returns {"rouge_l", "exact_match", "n"}; with no examples both means are
    0.0 and n is 0, so callers weighting by n are unaffected.
    """
    if len(predictions) != len(references_list):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references_list)} reference lists; they must pair up"
        )
    if not predictions:
        return {"rouge_l": 0.0, "exact_match": 0.0, "n": 0}
    return {
        "rouge_l": fmean(rouge_l(p, refs) for p, refs in zip(predictions, references_list)),
        "exact_match": fmean(exact_match(p, refs) for p, refs in zip(predictions, references_list)),
        "n": len(predictions),
    }
