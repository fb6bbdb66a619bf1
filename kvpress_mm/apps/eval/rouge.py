"""ROUGE-L F-measure as MileBench computes it (the ``rouge`` package's summary-level ROUGE-L).

MileBench's ``evaluate.py`` scores open-ended answers with ``Rouge().get_scores(pred, gt)
[0]["rouge-l"]["f"]`` from the ``rouge`` package (github.com/pltrdy/rouge, ``rouge/rouge.py``
and ``rouge/rouge_score.py``). That metric is reproduced here without the dependency:

- each text is split into sentences at ``"."`` (pieces of length 0 dropped), and each
  sentence's whitespace runs collapsed to single spaces;
- words are the sentences' ``split(" ")`` tokens; ``m`` and ``n`` are the numbers of
  *distinct* words of the reference and the candidate;
- for each reference sentence, the longest common subsequence with every candidate sentence
  is reconstructed (ties broken as the package does), and the distinct words of their union
  that were not already counted are added up: ``llcs``;
- ``R = llcs / m``, ``P = llcs / n``, ``F = 2 P R / (P + R + 1e-8)``.

>>> round(rouge_l("the cat sat on the mat", "the cat is on the mat"), 4)
0.8
"""

from __future__ import annotations

from collections.abc import Sequence


def _sentences(text: str) -> list[str]:
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _words(sentences: Sequence[str]) -> list[str]:
    return [word for sentence in sentences for word in sentence.split(" ")]


def lcs_words(reference: Sequence[str], candidate: Sequence[str]) -> set[str]:
    """The distinct words of one longest common subsequence (the ``rouge`` package's reconstruction)."""
    n, m = len(reference), len(candidate)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, previous = table[i], table[i - 1]
        for j in range(1, m + 1):
            if reference[i - 1] == candidate[j - 1]:
                row[j] = previous[j - 1] + 1
            else:
                row[j] = max(previous[j], row[j - 1])
    words: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(candidate: str, reference: str) -> float:
    """The ROUGE-L F-measure of ``candidate`` against ``reference`` (0 when either has no sentence)."""
    candidate_sentences, reference_sentences = _sentences(candidate), _sentences(reference)
    if not candidate_sentences or not reference_sentences:
        return 0.0
    m = len(set(_words(reference_sentences)))
    n = len(set(_words(candidate_sentences)))
    union: set[str] = set()
    llcs = 0
    for reference_sentence in reference_sentences:
        reference_words = reference_sentence.split(" ")
        before = len(union)
        for candidate_sentence in candidate_sentences:
            union |= lcs_words(reference_words, candidate_sentence.split(" "))
        llcs += len(union) - before
    recall, precision = llcs / m, llcs / n
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))
