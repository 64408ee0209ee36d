"""Text and code metrics for evaluation, on established implementations (sacrebleu, rouge_score, ast).

Hand-written BLEU variants disagree in tokenization, smoothing and brevity penalty, so numbers would not compare
with anything published; sacrebleu's corpus BLEU (13a tokenization) and Google's rouge_score are the references.
Scores are on a 0-100 scale (BLEU, ROUGE-L) or shares in [0, 1] (parse rate, exact match).
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Sequence


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults, one reference per hypothesis), 0-100; 0.0 for an empty corpus."""
    import sacrebleu

    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence-level ROUGE-L F1 (rouge_score, Porter stemming), 0-100; 0.0 for an empty corpus.

    rouge_score's default tokenizer keeps only [a-z0-9] words, which suits docstrings (not code: use BLEU there).
    """
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


def parses(code: str) -> bool:
    """Whether `code` is syntactically valid Python with at least one statement: the weakest bar rebuilt code
    must clear. Blank output (an untrained model's favourite) parses as an empty module but rebuilds nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. warn, they do not fail
            return bool(ast.parse(code).body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return False


def parse_rate(codes: Sequence[str]) -> float:
    """Share of `codes` that parse; 0.0 when there are none."""
    return sum(parses(c) for c in codes) / len(codes) if codes else 0.0


def strip_trivia(code: str) -> str:
    """Trailing whitespace per line and surrounding blank lines removed: differences nobody would call a bug."""
    return "\n".join(line.rstrip() for line in code.strip("\n").splitlines()).strip()


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share of hypotheses equal to their reference after `strip_trivia`; 0.0 for an empty corpus."""
    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    return sum(strip_trivia(h) == strip_trivia(r) for h, r in zip(hypotheses, references, strict=True)) / len(
        hypotheses
    )


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def std(values: Sequence[float]) -> float:
    """Population standard deviation (0.0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
