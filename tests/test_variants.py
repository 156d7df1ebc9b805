"""Beyond the paper: per-task balancing of the objective and sharpened targets, as pure maths
and through a real fit (start divergences measured independently with transformers; a resumed
balanced run keeps the weights of the run it continues)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from transformers import BertForSequenceClassification

from divmerge_pl import DivMergeModule, MergeDataModule, TaskSpec
from divmerge_pl.cli import main
from divmerge_pl.divergences import combine_tasks, js_divergence, relative_weights, sharpen
from divmerge_pl.methods import get_method, learned_name

from .test_fit import write_config
from .test_resume import InterruptAt, final_coefficients, with_callback


def test_relative_weights_are_the_papers_sum_when_every_task_starts_alike():
    means = torch.tensor([0.3, 0.01, 0.07])
    same = relative_weights(torch.full((3,), 0.2))
    assert torch.equal(same, torch.ones(3))
    assert combine_tasks(means, same) == combine_tasks(means) == means.sum()


def test_relative_weights_count_each_task_by_the_share_of_its_start_left():
    start = torch.tensor([0.4, 0.1])  # a confident expert far from the merge, an unsure one
    weights = relative_weights(start)
    torch.testing.assert_close(weights, torch.tensor([0.625, 2.5]))  # mean 0.25 / start
    # halving each task's divergence lowers the objective by the same amount for both tasks
    left = torch.tensor([0.2, 0.1]), torch.tensor([0.4, 0.05])
    assert combine_tasks(left[0], weights) == pytest.approx(combine_tasks(left[1], weights).item())


def test_sharpen_is_softmax_over_a_temperature_and_keeps_impossible_outcomes():
    logp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), dim=-1)
    logp[0, 3] = -math.inf  # a padded class
    assert torch.equal(sharpen(logp, 1.0), logp)
    sharp = sharpen(logp, 0.5)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 0.5, dim=-1).log()
    torch.testing.assert_close(sharp[0, :3], expected)
    assert sharp[0, 3] == -math.inf
    assert sharp.exp().sum().item() == pytest.approx(1.0)
    assert sharpen(logp, 0.05)[0, 0].exp() > 0.999  # towards the expert's own answer


def test_variants_are_registry_methods_that_name_their_runs():
    balanced, sharpened = get_method("balanced_layer"), get_method("sharpened_block")
    assert balanced.model_options()["task_weighting"] == "relative"
    assert sharpened.model_options()["teacher_temperature"] == 0.5
    assert balanced.lr == get_method("divmerge_layer").lr and balanced.init is None
    for name in ("balanced_layer", "sharpened_block", "divmerge_layer"):
        assert learned_name(get_method(name).model_options(), get_method(name).epochs) == name
    assert "task_weighting" not in get_method("divmerge_layer").settings()  # the paper's, unchanged


def _module_and_data(tiny, **model):
    module = DivMergeModule(**tiny.model_args(granularity="task", **model))
    data = MergeDataModule(
        [TaskSpec(**t) for t in tiny.task_specs()], batch_size=8, max_length=16, tokenizer=str(tiny.base)
    )
    return module, data


def test_start_divergences_are_each_tasks_mean_js_at_the_initial_coefficients(tiny):
    # init 0: the merged backbone is the base's, with task t's own head
    module, data = _module_and_data(tiny, init=0.0, task_weighting="relative")
    trainer = L.Trainer(max_epochs=0, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    rows = data.train_rows
    for dm_id, task in enumerate(data.task_names):
        expert = BertForSequenceClassification.from_pretrained(tiny.experts[task]).eval()
        merged = BertForSequenceClassification.from_pretrained(tiny.experts[task]).eval()
        merged.bert.load_state_dict(
            BertForSequenceClassification.from_pretrained(tiny.base).bert.state_dict(), strict=False
        )
        values = []
        for i in [i for i, t in enumerate(rows["task_id"]) if t == dm_id]:
            ids = torch.tensor([rows[i]["input_ids"]])
            with torch.no_grad():
                p = torch.log_softmax(expert(input_ids=ids).logits, -1)
                q = torch.log_softmax(merged(input_ids=ids).logits, -1)
            values.append(js_divergence(p, q).item())
        t = module.tasks.index(task)
        assert module.start_divergence[t].item() == pytest.approx(sum(values) / len(values), rel=1e-4)
    assert module.start_divergence[0] != pytest.approx(module.start_divergence[1].item(), rel=0.05)


def test_a_resumed_balanced_run_ends_where_an_unbroken_one_ends(tiny):
    balanced = {"task_weighting": "relative"}
    main(["fit", "--config", str(write_config(tiny, tiny.root / "whole", epochs=3, **balanced))])
    broken = tiny.root / "broken"
    config = with_callback(
        write_config(tiny, broken, epochs=3, **balanced), "tests.test_resume.InterruptAt", 8
    )
    assert InterruptAt  # the callback class is found by its path
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    main(["fit", "--config", str(write_config(tiny, broken, epochs=3, **balanced)), "--ckpt_path", "last"])
    whole = final_coefficients(tiny.root / "whole")
    torch.testing.assert_close(final_coefficients(broken), whole, atol=1e-6, rtol=0)
    main(["fit", "--config", str(write_config(tiny, tiny.root / "paper", epochs=3))])
    assert not torch.allclose(final_coefficients(tiny.root / "paper"), whole, atol=1e-4)  # it matters


def test_a_temperature_for_the_entropy_objective_is_refused(tiny):
    with pytest.raises(ValueError, match="entropy objective has no teacher"):
        DivMergeModule(**tiny.model_args(objective="entropy", teacher_temperature=0.5))
