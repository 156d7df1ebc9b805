"""Scores of generated answers: label-word matching and ROUGE through torchmetrics."""

import pytest
import torch

from divmerge_pl.metrics import AnswerMatch, RougeF1, TaskScores, normalize_answer


def test_answers_match_labels_however_they_are_spaced_cased_or_ended():
    assert normalize_answer("  Positive.\n") == "positive"
    assert normalize_answer("not  so, good!") == "not so good"
    metric = AnswerMatch()
    metric.update(
        [" Positive.", "negative", "positive sentiment", ""], ["positive", "Negative", "positive", "x"]
    )
    assert float(metric.compute()) == pytest.approx(0.5)


def test_rouge_is_the_f_measure_of_its_key():
    rouge1, rouge_l = RougeF1("rouge1"), RougeF1("rougeL")
    for metric in (rouge1, rouge_l):
        metric.update(["the cat sat on the mat"], ["the cat lay on the mat"])
    # 5 of 6 unigrams shared both ways: P = R = F = 5/6; the longest common subsequence is 5 too
    assert float(rouge1.compute()) == pytest.approx(5 / 6, abs=1e-4)
    assert float(rouge_l.compute()) == pytest.approx(5 / 6, abs=1e-4)
    swapped_l, swapped_1 = RougeF1("rougeL"), RougeF1("rouge1")
    for metric in (swapped_l, swapped_1):
        metric.update(["mat the on sat cat the"], ["the cat sat on the mat"])
    assert float(swapped_1.compute()) == pytest.approx(1.0)  # the same words
    assert float(swapped_l.compute()) == pytest.approx(0.5)  # in another order: LCS of 3


def test_rouge_reads_one_reference_per_answer_from_any_sequence():
    from datasets import Dataset

    answers, references = ["sport sport", "business news"], ["sport news 1", "business news 2"]
    column = Dataset.from_dict({"reference": references})["reference"]  # as a task's eval rows give them
    scores = []
    for given in (references, tuple(references), column):
        metric = RougeF1("rougeL")
        metric.update(tuple(answers), given)
        scores.append(float(metric.compute()))
    # LCS 1 of 2 / 3 words (F 0.4), then 2 of 2 / 3 (F 0.8)
    assert scores == [pytest.approx(0.6, abs=1e-4)] * 3


def test_task_scores_keep_one_metric_per_task():
    scores = TaskScores.for_answers(["accuracy", "rougeL"])
    scores.update(0, ["yes", "no"], ["yes", "yes"])
    assert scores.compute() == {0: pytest.approx(0.5)}  # task 1 unseen: no score
    classes = TaskScores.for_classes([2, 3], ["accuracy", "f1"])
    classes.update(1, torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]))
    # macro F1: class 0 right (1), class 1 half recalled (2/3), class 2 half precise (2/3)
    assert classes.compute()[1] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
