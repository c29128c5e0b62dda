"""What a clinical reviewer asks of a binary classifier, computed where the rows are.

For a two-class task every evaluation (a site's on its own rows, the server's on its
test set) adds, besides loss and accuracy:

- the confusion counts `tp`, `fp`, `tn`, `fn` (positive = class 1), from which
  `sensitivity` (recall of the positives), `specificity`, `balanced_accuracy` and `f1`
  follow. Counts add up across sites, so these four are exact for any set of sites
  (`pooled_binary`): the federation's values are the pooled rows' values.
- `auroc`, the area under the ROC curve of the scores P(class 1), with ties counted
  half (scikit-learn's `roc_auc_score`). An AUROC cannot be combined exactly from
  per-site AUROCs, so it is reported per site and on the server's test set, never
  averaged. Where a set of rows holds one class only it is left out (undefined).

A rate whose denominator is zero (no positives, say) is left out as well, never 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

COUNTS = ("tp", "fp", "tn", "fn")
RATES = ("sensitivity", "specificity", "balanced_accuracy", "f1")
AUROC = "auroc"


def binary_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Counts, rates and AUROC of `scores` (P(class 1), one per row) against `labels`
    (0/1), predicting class 1 where the score exceeds 1/2 (the argmax of two logits)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    predicted = scores > 0.5
    positive = labels == 1
    counts = {
        "tp": int((predicted & positive).sum()),
        "fp": int((predicted & ~positive).sum()),
        "tn": int((~predicted & ~positive).sum()),
        "fn": int((~predicted & positive).sum()),
    }
    result: dict[str, float] = {**counts, **rates(counts)}
    area = auroc(scores, positive)
    if area is not None:
        result[AUROC] = area
    return result


def rates(counts: Mapping[str, float]) -> dict[str, float]:
    """Sensitivity, specificity, balanced accuracy and F1 from confusion counts (those
    whose denominator is not zero)."""
    tp, fp, tn, fn = (float(counts[k]) for k in COUNTS)
    result: dict[str, float] = {}
    if tp + fn > 0:
        result["sensitivity"] = tp / (tp + fn)
    if tn + fp > 0:
        result["specificity"] = tn / (tn + fp)
    if "sensitivity" in result and "specificity" in result:
        result["balanced_accuracy"] = (result["sensitivity"] + result["specificity"]) / 2
    if 2 * tp + fp + fn > 0:
        result["f1"] = 2 * tp / (2 * tp + fp + fn)
    return result


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """The Mann-Whitney form of the area under the ROC curve: the chance that a random
    positive scores above a random negative, ties counting one half (None with one
    class only)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    rank_sum = ranks[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pooled_binary(sites: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The exact rates of the pooled rows from each site's confusion counts (sites that
    sent no counts are left out; empty when none did)."""
    totals = dict.fromkeys(COUNTS, 0.0)
    found = False
    for metrics in sites:
        if all(k in metrics for k in COUNTS):
            found = True
            for k in COUNTS:
                totals[k] += float(metrics[k])
    if not found:
        return {}
    return {**{k: int(v) for k, v in totals.items()}, **rates(totals)}
