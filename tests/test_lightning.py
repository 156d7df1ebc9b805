"""DivMerge inside the Lightning ecosystem: callback fragments in any LightningCLI, kilobyte
checkpoints tied to their experts, SIGTERM and SLURM's SIGUSR1 with exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from divmerge_pl import DivMergeModule, MergeDataModule
from divmerge_pl.cli import main
from divmerge_pl.merged import merge_tensors

from .test_fit import fit_module, run_dir, write_config

REPO = Path(__file__).resolve().parents[1]


def test_callback_fragments_plug_into_any_lightning_cli(tiny):
    """A plain LightningCLI (not ours) gets the export, the monitor and early stopping from the
    fragments in callbacks/."""
    config = write_config(tiny, tiny.root / "run", epochs=30)
    fragments = [
        f"--trainer.callbacks+={REPO / 'callbacks' / name}.yaml"
        for name in ("merged_model_export", "coefficient_monitor", "early_stopping")
    ]
    cli = LightningCLI(
        DivMergeModule,
        MergeDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=[
            "fit",
            "--config",
            str(config),
            f"--data.init_args.tokenizer={tiny.base}",
            *fragments,
            "--trainer.callbacks.init_args.min_delta=10",  # applies to the last one: early stopping
            "--trainer.log_every_n_steps=1",
        ],
    )
    run = run_dir(tiny.root / "run")
    for name in ("report.json", "coefficients.json", "coefficients.png", "divergence.png"):
        assert (run / name).is_file(), name
    assert (run / "merged" / "alpha" / "config.json").is_file()
    # early stopping on train/epoch_loss: a min_delta of 10 is never met, so patience 2 stops at epoch 3
    assert cli.trainer.current_epoch == 3
    logged = (run / "metrics.csv").read_text().splitlines()[0]
    assert "coef/alpha/mean" in logged and "train/epoch_loss" in logged


def test_checkpoint_holds_only_coefficients_and_is_tied_to_its_experts(tiny):
    main(["fit", "--config", str(write_config(tiny, tiny.root / "run", epochs=1))])
    checkpoint = run_dir(tiny.root / "run") / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    assert list(state["state_dict"]) == ["coefficients"]
    assert set(state["divmerge"]["fingerprints"]) == {"base", "alpha", "beta", "data"}
    model_bytes = sum(p.stat().st_size for p in tiny.root.glob("experts/*/model.safetensors"))
    assert checkpoint.stat().st_size < 0.2 * model_bytes  # tiny models: real ones are ~1000x bigger

    expert = AutoModelForSequenceClassification.from_pretrained(tiny.experts["beta"])
    with torch.no_grad():
        expert.bert.pooler.dense.bias.add_(0.5)
    expert.save_pretrained(tiny.experts["beta"])
    config = write_config(tiny, tiny.root / "resumed", epochs=2)
    with pytest.raises(ValueError, match=r"other weights or data: 'beta' .* changed since"):
        main(["fit", "--config", str(config), "--ckpt_path", str(checkpoint)])


class SlowSteps(L.Callback):
    """Slows each step down and records progress, so another process can signal mid-run."""

    def __init__(self, seconds: float, progress: str) -> None:
        self.seconds = seconds
        self.progress = Path(progress)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.progress.write_text(str(trainer.global_step))
        time.sleep(self.seconds)


def _run_and_signal(config: Path, sig: int, at_step: int, env: dict[str, str], progress: Path) -> int:
    process = subprocess.Popen(
        [sys.executable, "-m", "divmerge_pl.cli", "fit", "--config", str(config)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        # read once: the writer truncates the file before writing, so a second read may see ""
        text = progress.read_text().strip() if progress.is_file() else ""
        if text and int(text) >= at_step:
            break
        time.sleep(0.05)
    process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # SIGUSR1 only checkpoints and requeues: the job goes on
        process.kill()
        _, err = process.communicate()
    assert "Traceback" not in err or "SIGTERM" in err or sig != signal.SIGTERM, err[-3000:]
    return process.returncode


def _slow_config(tiny, folder: Path, progress: Path) -> Path:
    config = write_config(tiny, folder, epochs=3)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"] = [
        {
            "class_path": "tests.test_lightning.SlowSteps",
            "init_args": {"seconds": 0.3, "progress": str(progress)},
        }
    ]
    config.write_text(yaml.safe_dump(data))
    return config


def _final(folder: Path) -> torch.Tensor:
    runs = sorted((folder / "lightning_logs").iterdir())
    return torch.tensor(json.loads((runs[-1] / "coefficients.json").read_text())["values"])


def test_sigterm_then_resume_ends_like_an_unbroken_run(tiny):
    main(["fit", "--config", str(write_config(tiny, tiny.root / "whole", epochs=3))])
    progress = tiny.root / "progress"
    broken = tiny.root / "broken"
    _run_and_signal(_slow_config(tiny, broken, progress), signal.SIGTERM, 8, {}, progress)
    checkpoint = run_dir(broken) / "checkpoints" / "last.ckpt"
    step = torch.load(checkpoint, weights_only=False)["global_step"]
    assert 8 <= step < 18  # stopped mid-run, on a step boundary
    main(["fit", "--config", str(write_config(tiny, broken, epochs=3)), "--ckpt_path", str(checkpoint)])
    torch.testing.assert_close(_final(broken), _final(tiny.root / "whole"), atol=1e-6, rtol=0)


def test_slurm_requeue_signal_saves_a_checkpoint_that_resumes_exactly(tiny, tmp_path):
    main(["fit", "--config", str(write_config(tiny, tiny.root / "whole", epochs=3))])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "requeued"
    scontrol = bin_dir / "scontrol"  # what the cluster would run: record the call
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {requeued}\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "divmerge",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    progress = tiny.root / "progress"
    broken = tiny.root / "broken"
    _run_and_signal(_slow_config(tiny, broken, progress), signal.SIGUSR1, 8, slurm, progress)
    assert requeued.read_text().split() == ["requeue", "4242"]
    (hpc,) = broken.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, weights_only=False)["global_step"] >= 8
    # the requeued job starts again with the same command: Lightning finds hpc_ckpt by itself
    config = write_config(tiny, broken, epochs=3)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in slurm.items():
            patch.setenv(key, value)
        main(["fit", "--config", str(config)])
    torch.testing.assert_close(_final(broken), _final(tiny.root / "whole"), atol=1e-6, rtol=0)


def test_slurm_job_environment_is_detected(tiny, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for key, value in {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "divmerge",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }.items():
        monkeypatch.setenv(key, value)
    cli = main_cli(["--config", str(write_config(tiny, tiny.root / "run"))])
    environment = cli.trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert environment.auto_requeue and environment.job_id() == 7


def main_cli(args: list[str]):
    from divmerge_pl.cli import build_cli

    return build_cli(args, run=False)


def test_two_cpu_processes_with_ddp_learn_what_one_process_learns(tiny):
    """Same global batch (2 x 4 rows against 1 x 8): the same coefficients, to float tolerance."""
    main(["fit", "--config", str(write_config(tiny, tiny.root / "single", epochs=2))])
    config = write_config(tiny, tiny.root / "ddp", epochs=2)
    done = subprocess.run(
        [
            sys.executable, "-m", "divmerge_pl.cli", "fit", "--config", str(config),
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--data.init_args.batch_size=4",
            "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy",
            "--trainer.strategy.process_group_backend=gloo", "--trainer.strategy.broadcast_buffers=false",
            f"--model.init_args.teacher_cache={tiny.root / 'ddp_teachers'}",  # computed anew, split
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # each rank computed every other row of each expert's outputs; gathered, the cache written
    # once holds what one process computes alone
    single_cache = sorted((tiny.root / "teacher_cache").glob("*.safetensors"))
    ddp_cache = sorted((tiny.root / "ddp_teachers").glob("*.safetensors"))
    assert [p.name for p in ddp_cache] == [p.name for p in single_cache] and len(single_cache) == 2
    for one, two in zip(single_cache, ddp_cache, strict=True):
        alone, split = load_file(one), load_file(two)
        assert alone.keys() == split.keys()
        for key in alone:
            torch.testing.assert_close(split[key], alone[key], atol=1e-5, rtol=0)
    single, ddp = _final(tiny.root / "single"), _final(tiny.root / "ddp")
    assert not torch.allclose(single, torch.full_like(single, 0.5))
    # the gradient is summed in another order across ranks; Adam, scale-free, turns that rounding
    # into up to ~1e-5 here on AMD EPYC (the coefficients move by ~0.12; per-rank task means
    # instead of global ones, a real bug, differ by ~2e-2)
    torch.testing.assert_close(ddp, single, atol=1e-4, rtol=0)
    # the export ran once, on rank 0, with the validation scores gathered from both ranks
    reports = [json.loads(p.read_text()) for p in (tiny.root / "ddp").rglob("report.json")]
    (report,) = reports
    single_report = json.loads(next((tiny.root / "single").rglob("report.json")).read_text())
    assert report["tasks"] == single_report["tasks"]


def test_sampler_shards_give_the_single_process_batches():
    from divmerge_pl.sampling import EpochShuffle

    for size in (48, 50):
        whole = list(EpochShuffle(range(size), seed=3))
        shards = [list(EpochShuffle(range(size), seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == -(-size // 2)
        interleaved = [i for pair in zip(*shards, strict=True) for i in pair]
        assert interleaved[:size] == whole  # batch k of each rank together = single-process batch k


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_precisions_and_bf16_task_vectors(tiny, precision):
    fp32, _ = fit_module(tiny, {"alpha": 2, "beta": 3}, max_steps=0)
    module, _ = fit_module(
        tiny, {"alpha": 2, "beta": 3}, max_steps=4, task_vector_dtype="bfloat16", precision=precision
    )
    stored = module.frozen.task_vectors()
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    full = fp32.frozen.task_vectors()
    assert sum(v.nbytes for v in stored.values()) * 2 == sum(v.nbytes for v in full.values())
    assert torch.isfinite(module.coefficients).all()
    assert not torch.equal(module.coefficients, fp32.coefficients)  # it trained
    # the merge from bf16 vectors is within bf16 rounding of the float32 merge
    gamma = module.coefficients.detach()
    with torch.no_grad():
        low = merge_tensors(fp32.frozen.base_tensors(), stored, gamma, module.layout)
        high = merge_tensors(fp32.frozen.base_tensors(), full, gamma, module.layout)
    for name in high:
        g = gamma[:, module.layout.group_of[name]].abs()
        bound = 2**-8 * torch.tensordot(g, full[name].abs(), dims=1) + 1e-7
        assert ((low[name] - high[name]).abs() <= bound).all(), name


def test_sharded_strategies_are_refused_before_any_model_loads(tiny, monkeypatch):
    """FSDP needs a GPU in Lightning, so its trainer is stood in for; on a GPU (H200) the real
    FSDP fit failed at its first checkpoint, inside FSDP's state-dict hook."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from divmerge_pl import module as module_file

    monkeypatch.setattr(module_file, "load_experts", lambda *a: pytest.fail("models loaded"))
    module = DivMergeModule(base=str(tiny.base), experts={t: str(p) for t, p in tiny.experts.items()})
    trainer = L.Trainer(accelerator="cpu", logger=False)
    module.trainer = trainer
    monkeypatch.setattr(L.Trainer, "strategy", property(lambda self: FSDPStrategy()))
    with pytest.raises(ValueError, match=r"trainer.strategy FSDPStrategy shards .* use task_vector_sharding"):
        module.setup("fit")
    module_file.check_strategy(DDPStrategy())  # replicated strategies pass


class UserClassifier(L.LightningModule):
    """A user's own fine-tuning module: knows nothing of divmerge-pl."""

    def __init__(self, base: str, num_labels: int) -> None:
        super().__init__()
        self.net = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_merge_on_fit_end_merges_a_users_own_expert(tiny, capsys):
    from transformers import AutoTokenizer

    from divmerge_pl import MergeDataModule, MergeOnFitEnd, TaskSpec

    tokenizer = AutoTokenizer.from_pretrained(tiny.base)
    rows = [json.loads(line) for line in tiny.train["alpha"].read_text().splitlines()]

    def collate(chunk):
        batch = tokenizer([r["text"] for r in chunk], padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([r["label"] for r in chunk])
        return dict(batch)

    loader = torch.utils.data.DataLoader(rows, batch_size=8, collate_fn=collate)
    data = MergeDataModule([TaskSpec(**s) for s in tiny.task_specs()], batch_size=8, max_length=16)
    callback = MergeOnFitEnd(
        task="alpha",
        expert_dir=str(tiny.root / "my_expert"),
        base=str(tiny.base),
        experts={"beta": str(tiny.experts["beta"])},
        data=data,
        output_dir=str(tiny.root / "merged_run"),
        max_epochs=1,
        teacher_cache=None,
    )
    user = UserClassifier(str(tiny.base), num_labels=2)
    outer = L.Trainer(
        max_steps=3, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    outer.fit(user, loader)
    # the inner merge follows the user's run: no bar, no logger, the same precision
    assert callback.merger.precision == outer.precision and callback.merger.progress_bar_callback is None
    assert not callback.merger.loggers and not (tiny.root / "merged_run" / "divmerge").exists()
    assert "Epoch 0" not in capsys.readouterr().err
    assert AutoTokenizer.from_pretrained(tiny.root / "my_expert").get_vocab() == tokenizer.get_vocab()

    saved = AutoModelForSequenceClassification.from_pretrained(tiny.root / "my_expert")
    assert torch.equal(saved.classifier.weight, user.net.classifier.weight)
    out = tiny.root / "merged_run"
    coefficients = json.loads((out / "coefficients.json").read_text())
    assert coefficients["tasks"] == ["beta", "alpha"]
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged" / "alpha")
    assert torch.equal(merged.classifier.weight, user.net.classifier.weight)  # the user's head, kept
    assert not torch.equal(
        merged.bert.encoder.layer[0].output.dense.weight, saved.bert.encoder.layer[0].output.dense.weight
    )
    assert set(json.loads((out / "report.json").read_text())["tasks"]) == {"alpha", "beta"}


def _printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    "configs",
    [
        ["demo.yaml"],
        ["template.yaml"],
        ["demo.yaml", "ddp.yaml"],
        ["demo.yaml", "slurm/slurm.yaml"],
        ["demo.yaml", "sharded.yaml"],
    ],
)
def test_shipped_configs_parse(configs, capsys):
    printed = _printed_config(capsys, *[a for c in configs for a in ("--config", str(REPO / "configs" / c))])
    assert printed["model"]["class_path"] == "divmerge_pl.DivMergeModule"
    if len(configs) > 1:
        assert printed["trainer"]["strategy"]["init_args"]["broadcast_buffers"] is False


def test_sharded_sbatch_keeps_the_sharded_strategy_over_slurm_settings(capsys):
    """The sbatch's srun line, with the demo as its config: sharded.yaml's strategy replaces
    slurm.yaml's DDP, slurm.yaml's GPU and precision stay, and the strategy's class resolves."""
    from importlib import import_module

    from divmerge_pl.sharding import TaskVectorSharding

    (line,) = (REPO / "configs/slurm/sharded.sbatch").read_text().split("\nsrun ")[1:]
    argv = line.replace("\\\n", " ").split()[2:]  # after "divmerge-pl fit"
    argv = [str(REPO / "configs/demo.yaml") if a == '"$CONFIG"' else a for a in argv]
    argv = [str(REPO / a) if a.startswith("configs/") else a for a in argv]
    printed = _printed_config(capsys, *argv)
    trainer = printed["trainer"]
    module, _, name = trainer["strategy"]["class_path"].rpartition(".")
    assert getattr(import_module(module), name) is TaskVectorSharding
    assert trainer["strategy"]["init_args"]["process_group_backend"] is None
    assert (trainer["accelerator"], trainer["precision"], int(trainer["devices"])) == ("gpu", "bf16-mixed", 8)


def test_test_and_validate_log_under_their_own_prefixes(tiny):
    from divmerge_pl.cli import build_cli

    config = str(write_config(tiny, tiny.root / "run", epochs=1))
    cli = build_cli(["--config", config], run=False)
    (validated,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    (tested,) = cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert "val/normalized" in validated and not [k for k in validated if k.startswith("test/")]
    assert "test/normalized" in tested and not [k for k in tested if k.startswith("val/")]
    assert tested["test/normalized"] == validated["val/normalized"]  # the same rows, the same merge


def test_shares_of_rows_are_interleaved_back_into_row_order():
    from divmerge_pl.teachers import interleave_shares

    rows, world = 7, 3  # rank r holds rows r, r + 3, ...; the last share is padded
    shares = torch.full((world, 3, 2), -1.0)
    for r in range(world):
        mine = list(range(r, rows, world))
        shares[r, : len(mine)] = torch.tensor([[i, 10 * i] for i in mine], dtype=torch.float)
    expected = torch.tensor([[i, 10 * i] for i in range(rows)], dtype=torch.float)
    assert torch.equal(interleave_shares(shares, rows), expected)
