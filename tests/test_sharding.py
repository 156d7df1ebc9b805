"""Sharded mode: each process holds 1/W of the base and task vectors, gathers each module's
merged weight just before it runs, and learns the coefficients one process learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from divmerge_pl.sharding import local_part, shard_bounds

from .test_fit import write_config
from .test_lightning import REPO

TWO_PROCESSES = {  # 2 gloo CPU processes x 4 rows: the single process's 8-row batches
    "ddp": [
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--data.init_args.batch_size=4",
        "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy",
        "--trainer.strategy.process_group_backend=gloo", "--trainer.strategy.broadcast_buffers=false",
    ],
    "sharded": [
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--data.init_args.batch_size=4",
        "--trainer.strategy=divmerge_pl.sharding.TaskVectorSharding",
        "--trainer.strategy.process_group_backend=gloo",
    ],
}  # fmt: skip
SHARDED = TWO_PROCESSES["sharded"]


@pytest.mark.parametrize("size", [1, 5, 7, 8])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_parts_are_torch_chunk_parts(size, world):
    """DTensor's Shard(0) cuts as torch.chunk does; gathering assumes our parts are those."""
    tensor = torch.arange(size * 3.0).reshape(size, 3)
    chunks = list(torch.chunk(tensor, world))
    chunks += [tensor[size:]] * (world - len(chunks))  # ranks past the last chunk hold nothing
    for rank in range(world):
        assert torch.equal(local_part(tensor, rank, world), chunks[rank])
    assert sum(e - s for s, e in (shard_bounds(size, r, world) for r in range(world))) == size


def _rank_worker(
    rank: int, world: int, init_file: str, base: str, experts: dict, out: str, granularity: str
) -> None:
    from divmerge_pl.coefficients import build_layout
    from divmerge_pl.experts import load_experts
    from divmerge_pl.sharding import Sharding
    from divmerge_pl.task_vectors import FrozenExperts

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sharding = Sharding(torch.device("cpu"))
    whole = FrozenExperts(load_experts(base, experts))
    part = FrozenExperts(load_experts(base, experts, keep=sharding.part), sharding=sharding)
    layout = build_layout(whole.merged_names(), granularity, "", whole.rows())
    gamma = torch.linspace(-0.3, 0.9, 2 * layout.width).reshape(2, -1)  # channel: a value per row
    g_whole, g_part = gamma.clone().requires_grad_(), gamma.clone().requires_grad_()
    make_whole, make_part = whole.merge_at(g_whole, layout), part.merge_at(g_part, layout)
    errors, loss_whole, loss_part = [], 0.0, 0.0
    for name in whole.names:
        merged = make_part(name)
        errors.append(float((merged - make_whole(name)).abs().max()))
        # a different "batch" on each rank: the gradient must be summed over ranks
        weights = [torch.randn(merged.shape, generator=torch.Generator().manual_seed(r)) for r in range(2)]
        loss_part = loss_part + (merged * weights[rank]).sum()
        both = sum(weights)
        loss_whole = loss_whole + (make_whole(name) * both).sum()
    loss_part.backward()
    loss_whole.backward()
    grad = g_part.grad.clone()
    dist.all_reduce(grad)  # what DDP does (as a mean) to each rank's part of Gamma's gradient
    expert = part.expert_at(1)
    expert_error = max(float((expert(n) - whole.expert_at(1)(n)).abs().max()) for n in whole.names)
    head_names = {n for names in whole.head_names for n in names}
    heads = sum(t.nbytes for n, t in whole.named_buffers() if n.startswith("head_"))
    heads += sum(p.nbytes for n, p in whole.base_model.named_parameters() if n in head_names)
    result = {
        "merge_error": max(errors),
        "expert_error": expert_error,
        "grad_error": float((grad - g_whole.grad).abs().max()),
        "grad_scale": float(g_whole.grad.abs().max()),
        "held": part.held_bytes(),
        "whole_held": whole.held_bytes(),
        "head_bytes": heads,
    }
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_each_rank_holds_its_part_and_gathers_the_whole_merge(tiny, tmp_path, granularity):
    """Two gloo processes: every gathered merged / expert tensor equals the unsharded one, Gamma's
    gradient summed over ranks equals the whole one's, and each rank holds about (N + 1) / W
    models of the merged tensors. Channel: each rank merges its rows with those rows' coefficients."""
    world, out = 2, str(tmp_path / "result")
    args = (world, str(tmp_path / "init"), str(tiny.base), dict(tiny.experts), out, granularity)
    mp.spawn(_rank_worker, args=args, nprocs=world, join=True)
    results = [json.loads(open(f"{out}.{r}").read()) for r in range(world)]
    for result in results:
        assert result["merge_error"] < 1e-6 and result["expert_error"] < 1e-6
        assert result["grad_error"] < 1e-5 * max(1.0, result["grad_scale"])
        # base + 2 task vectors cut in two (heads stay whole: each is one task's): 1.5 models, not 3
        cut = result["whole_held"] - result["head_bytes"]
        assert result["held"] < 1.15 * cut / world + result["head_bytes"]
        assert result["held"] < 0.6 * result["whole_held"]


# what Lightning sets in a process that ran a DDP-family strategy (the one-process tests here): a
# child inheriting MASTER_PORT would try to listen where this process's store still does
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


@pytest.fixture
def own_process_group(monkeypatch):
    """A one-process fit's process group and environment, gone after the test."""
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in DIST_ENV:
        os.environ.pop(key, None)


def _fit(config, *options: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    return subprocess.run(
        [sys.executable, "-m", "divmerge_pl.cli", "fit", "--config", str(config), *options],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_two_sharded_processes_learn_what_one_process_learns(tiny):
    from divmerge_pl.cli import main

    from .test_lightning import _final

    main(["fit", "--config", str(write_config(tiny, tiny.root / "single", epochs=2))])
    done = _fit(
        write_config(tiny, tiny.root / "sharded", epochs=2),
        *SHARDED,
        f"--model.init_args.teacher_cache={tiny.root / 'sharded_teachers'}",  # computed anew, split
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded across 2 processes" in done.stderr + done.stdout
    single, sharded = _final(tiny.root / "single"), _final(tiny.root / "sharded")
    assert not torch.allclose(single, torch.full_like(single, 0.5))
    torch.testing.assert_close(sharded, single, atol=1e-4, rtol=0)  # as DDP (test_lightning)
    # the export gathered the merge on both ranks and wrote it once: the same report and weights
    (report,) = [json.loads(p.read_text()) for p in (tiny.root / "sharded").rglob("report.json")]
    single_report = json.loads(next((tiny.root / "single").rglob("report.json")).read_text())
    assert report["tasks"] == single_report["tasks"]
    from safetensors.torch import load_file

    for task in tiny.experts:
        ours = load_file(next((tiny.root / "sharded").rglob(f"merged/{task}/model.safetensors")))
        theirs = load_file(next((tiny.root / "single").rglob(f"merged/{task}/model.safetensors")))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0)


def test_one_sharded_process_learns_what_a_plain_run_learns(tiny, caplog, own_process_group):
    """W = 1: the whole tensors, still merged through the DTensor gather (the one-GPU check)."""
    import logging

    from divmerge_pl.cli import main

    from .test_lightning import _final

    main(["fit", "--config", str(write_config(tiny, tiny.root / "plain", epochs=1))])
    caplog.set_level(logging.INFO)
    main(
        [
            "fit", "--config", str(write_config(tiny, tiny.root / "one", epochs=1)),
            "--trainer.strategy=task_vector_sharding",  # registered name; gloo on CPUs
        ]
    )  # fmt: skip
    torch.testing.assert_close(_final(tiny.root / "one"), _final(tiny.root / "plain"), atol=1e-6, rtol=0)
    assert "sharded across 1 processes" in caplog.text


def test_sharded_mode_refuses_what_needs_whole_vectors(tiny, monkeypatch, own_process_group):
    from divmerge_pl import module as module_file
    from divmerge_pl.cli import main

    monkeypatch.setattr(module_file, "load_experts", lambda *a, **k: pytest.fail("models loaded"))
    config = write_config(tiny, tiny.root / "ties", epochs=1)
    sharded = ["--trainer.strategy=task_vector_sharding"]
    with pytest.raises(ValueError, match="task_vector_transform 'ties' with trainer.strategy task_vector_sh"):
        main(["fit", "--config", str(config), *sharded, "--model.init_args.task_vector_transform=ties"])
    with pytest.raises(ValueError, match="merge_on_demand false with trainer.strategy task_vector_sharding"):
        main(["fit", "--config", str(config), *sharded, "--model.init_args.merge_on_demand=false"])


def test_a_resumed_sharded_run_ends_like_an_unbroken_one(tiny):
    """A SLURM requeue in sharded mode: the checkpoint holds Gamma and Adam only; every process
    cuts its part again from the same files, and the run ends where an unbroken one does."""
    from divmerge_pl.cli import main

    from .test_resume import final_coefficients

    main(["fit", "--config", str(write_config(tiny, tiny.root / "unbroken", epochs=2))])
    folder = tiny.root / "broken"
    first = _fit(write_config(tiny, folder, epochs=1), *SHARDED)
    assert first.returncode == 0, first.stderr[-3000:]
    (checkpoint,) = folder.rglob("last.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    assert list(saved["state_dict"]) == ["coefficients"]  # no shard of anything
    resumed = _fit(write_config(tiny, folder, epochs=2), *SHARDED, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {checkpoint}" in resumed.stderr + resumed.stdout
    unbroken = final_coefficients(tiny.root / "unbroken")
    assert not torch.allclose(unbroken, torch.full_like(unbroken, 0.5))
    torch.testing.assert_close(final_coefficients(folder), unbroken, atol=1e-4, rtol=0)
