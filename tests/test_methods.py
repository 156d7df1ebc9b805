"""The method registry: each method's own published settings, how runs record and reproduce
them, and training-free settings chosen on labelled validation rows, never the scored ones."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict

import pytest
import torch
import yaml
from safetensors.torch import load_file

from divmerge_pl import DivMergeModule
from divmerge_pl.cli import main
from divmerge_pl.methods import DEFAULT_METHODS, METHODS, get_method, learned_name
from divmerge_pl.run_cli import build_run

from .conftest import build_setup, write_rows
from .test_fit import run_dir, write_config


def test_each_family_keeps_its_published_defaults():
    for name, method in METHODS.items():
        if method.kind != "learned":
            continue
        # over TSV's decorrelated parts every family starts at TSV-Merge (each part at alpha = 1)
        tsv = name.endswith("_tsv")
        if name.startswith("adamerging"):  # Yang et al. 2024 and its code; DivMerge Table 9: 5 epochs
            assert (method.objective, method.lr, method.init, method.clamp, method.epochs) == (
                "entropy", 1e-3, 1.0 if tsv else 0.3, (0.0, 1.0), 5,
            )  # fmt: skip
        else:  # DivMerge: Adam 1e-2, init 1/N, unconstrained, 4 epochs
            init = 1.0 if tsv else None
            assert (method.lr, method.init, method.clamp, method.epochs) == (1e-2, init, None, 4)
            assert method.objective == ("kl" if name.startswith("divmerge_kl") else "js")
        layouts = [part for part in name.split("_") if part in ("task", "layer", "block", "channel")]
        assert method.granularity == (layouts[0] if layouts else "layer")
        suffix = name.rsplit("_", 1)[-1]
        assert method.task_vector_transform == (suffix if suffix in ("ties", "dare", "tsv") else "none")
    assert METHODS["ties"].params == {"density": 0.2, "scale": 1.0, "scope": "model"}
    assert METHODS["task_arithmetic"].params == {"scale": 0.3}
    assert METHODS["dare"].params["drop_rate"] == 0.9
    assert METHODS["tsv"].params == {"scale": 1.0}  # TSV-Merge's alpha
    # its validation grid holds the published alpha and reaches past the demo's choice (2.0)
    assert 1.0 in METHODS["tsv"].grid["scale"] and max(METHODS["tsv"].grid["scale"]) > 2.0
    # compare's default list holds every baseline family, the strongest (tsv) included
    assert {"average", "task_arithmetic", "ties", "dare", "tsv"} <= set(DEFAULT_METHODS.split(","))
    assert set(METHODS["ties"].grid) == {"density", "scale"}
    assert all(m.reference for m in METHODS.values())


def test_fit_with_the_module_defaults_is_divmerge_layer():
    defaults = {
        k: p.default for k, p in inspect.signature(DivMergeModule.__init__).parameters.items() if k != "self"
    }
    method = METHODS["divmerge_layer"]
    for key, value in method.model_options().items():
        assert defaults[key] == value, key
    assert learned_name(defaults, 4) == "divmerge_layer"
    assert learned_name({**defaults, "lr": 0.02}, 4) is None


def test_overrides_are_checked_and_a_given_parameter_is_not_chosen():
    ties = get_method("ties", {"density": 0.1})
    assert ties.params["density"] == 0.1 and "density" not in ties.grid and "scale" in ties.grid
    with pytest.raises(ValueError, match=r"ties: unknown setting\(s\) \['lambda'\]"):
        get_method("ties", {"lambda": 1.0})
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        get_method("ties", {"density": 2.0})
    with pytest.raises(ValueError, match="unknown method 'adamergin'.*adamerging_layer"):
        get_method("adamergin")
    ada = get_method("adamerging_task", {"lr": 0.005, "clamp": [0, 2]})
    assert ada.lr == 0.005 and ada.clamp == (0.0, 2.0) and ada.init == 0.3


def test_adamerging_runs_at_its_own_settings_and_the_merge_uses_clamped_coefficients(tmp_path):
    tiny = build_setup(tmp_path, {"alpha": 2, "beta": 3})
    config = write_config(tiny, tmp_path / "run")
    # a large lr drives some coefficients beyond [0, 1]; the merge must use them clipped
    main(["merge", "--config", str(config), "--method", "adamerging_task",
          "--method_args", "{lr: 0.5}", "--trainer.max_epochs=2"])  # fmt: skip
    run = run_dir(tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    model = saved["model"]["init_args"]
    assert (model["objective"], model["granularity"], model["lr"], model["init"], model["clamp"]) == (
        "entropy", "task", 0.5, 0.3, [0.0, 1.0],
    )  # fmt: skip
    assert saved["trainer"]["max_epochs"] == 2  # the user's option wins over the method's 5
    report = json.loads((run / "report.json").read_text())
    settings = report["settings"]
    assert settings["lr"] == 0.5 and settings["clamp"] == [0.0, 1.0] and settings["epochs"] == 2
    assert settings["init"] == 0.3 and settings["inputs_per_task"] == {"alpha": 24, "beta": 24}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    raw = ckpt["state_dict"]["coefficients"]
    assert ((raw < 0) | (raw > 1)).any(), "lr 0.5 should push a coefficient out of [0, 1]"
    gamma = raw.clamp(0, 1)
    values = json.loads((run / "coefficients.json").read_text())["values"]
    torch.testing.assert_close(torch.tensor(values), gamma)
    base = load_file(tiny.base / "model.safetensors")
    experts = {t: load_file(p / "model.safetensors") for t, p in tiny.experts.items()}
    merged = load_file(run / "merged" / "alpha" / "model.safetensors")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    theta0 = base[name.removeprefix("bert.")]
    expected = theta0 + sum(
        gamma[i, 0] * (experts[t][name] - theta0) for i, t in enumerate(["alpha", "beta"])
    )
    torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=0)

    # the saved config re-runs that very method
    again = tmp_path / "again"
    saved["trainer"]["default_root_dir"] = str(again)
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(saved))
    main(["fit", "--config", str(tmp_path / "again.yaml")])
    rerun = json.loads((run_dir(again) / "coefficients.json").read_text())["values"]
    torch.testing.assert_close(torch.tensor(rerun), gamma, atol=1e-6, rtol=0)


def with_val_files(tiny, config, rows: int = 30):
    data = yaml.safe_load(config.read_text())
    for i, task in enumerate(data["data"]["init_args"]["tasks"]):
        path = tiny.root / "data" / task["name"] / "val.jsonl"
        if not path.exists():
            write_rows(path, rows, tiny.labels[task["name"]], seed=50 + i)
        task["val_files"] = str(path)
    config.write_text(yaml.safe_dump(data))
    return config


def test_validation_epochs_score_the_labelled_validation_rows_and_test_epochs_the_scored_ones(tmp_path):
    tiny = build_setup(tmp_path, {"alpha": 3, "beta": 2}, scale=1.0)
    config = with_val_files(tiny, write_config(tiny, tmp_path / "run", epochs=1))
    cli = build_run(["--config", str(config)])
    (validated,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    (tested,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    on_val, scored = cli.model.evaluate("tuning"), cli.model.evaluate("eval")
    # val/: the merge against each expert on the val_files rows, where choices may be made
    assert validated["val/normalized"] == pytest.approx(on_val["average"]["normalized"], abs=1e-6)
    for task, row in on_val["tasks"].items():
        assert validated[f"val/{task}/normalized"] == pytest.approx(row["normalized"], abs=1e-6)
        assert validated[f"val/{task}/expert_accuracy"] == pytest.approx(row["expert"], abs=1e-6)
    # test/ and the report: the scored rows, which no val/ metric has seen
    assert tested["test/normalized"] == pytest.approx(scored["average"]["normalized"], abs=1e-6)
    assert validated["val/normalized"] != pytest.approx(tested["test/normalized"], abs=1e-6)


def test_scale_is_chosen_on_validation_rows_never_on_the_scored_ones(tmp_path):
    tiny = build_setup(tmp_path, {"alpha": 3, "beta": 2}, scale=1.0)  # far from the base: scale matters
    grid = [0.0, 0.5, 1.0]
    config = with_val_files(tiny, write_config(tiny, tmp_path / "tuned"))
    main(["merge", "--config", str(config), "--method", "task_arithmetic",
          "--method_args", json.dumps({"grid": {"scale": grid}})])  # fmt: skip
    report = json.loads((run_dir(tmp_path / "tuned") / "report.json").read_text())
    chosen = report["settings"]
    assert chosen["chosen_on"] == "labelled validation rows (val_files)"
    trials = {t["params"]["scale"]: t["normalized"] for t in chosen["trials"]}
    assert list(trials) == grid
    assert chosen["chosen"] == {"scale": max(trials, key=trials.get)} == {"scale": report["params"]["scale"]}

    # each trial is that scale's score on the validation rows (the val files scored as eval rows),
    # not on the eval rows the report scores
    on_eval, on_val = {}, {}
    for scale in grid:
        for name, swap in (("eval", False), ("val", True)):
            folder = tmp_path / f"{name}_{scale}"
            plain = write_config(tiny, folder)
            if swap:
                data = yaml.safe_load(plain.read_text())
                for task in data["data"]["init_args"]["tasks"]:
                    task["eval_files"] = str(tiny.root / "data" / task["name"] / "val.jsonl")
                plain.write_text(yaml.safe_dump(data))
            main(["merge", "--config", str(plain), "--method", "task_arithmetic",
                  "--method_args", json.dumps({"scale": scale})])  # fmt: skip
            score = json.loads((run_dir(folder) / "report.json").read_text())["average"]["normalized"]
            (on_val if swap else on_eval)[scale] = score
    assert trials == pytest.approx(on_val, abs=1e-9)
    assert on_eval != pytest.approx(on_val, abs=1e-9)


def test_the_saved_config_of_a_merge_run_reproduces_its_training_free_method(tmp_path):
    tiny = build_setup(tmp_path, {"alpha": 3, "beta": 2}, scale=1.0)
    config = with_val_files(tiny, write_config(tiny, tmp_path / "run"))
    grid = {"scale": [0.0, 0.5, 1.0]}
    main(["merge", "--config", str(config), "--method", "task_arithmetic",
          "--method_args", json.dumps({"grid": grid})])  # fmt: skip
    run = run_dir(tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    method = get_method("task_arithmetic", {"grid": grid})
    assert saved["model"]["init_args"]["static_method"] == asdict(method)
    report = json.loads((run / "report.json").read_text())
    assert report["settings"]["chosen_on"] == "labelled validation rows (val_files)"

    # the method is an argument of the module: the config alone builds and scores it again
    saved["trainer"]["default_root_dir"] = str(tmp_path / "again")
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(saved))
    cli = build_run(["--config", str(tmp_path / "again.yaml")])
    assert cli.model.static_method == method
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert json.loads(json.dumps(cli.model.evaluate())) == report
    with pytest.raises(ValueError, match="'task_arithmetic' is training-free: it has no coefficients to fit"):
        main(["fit", "--config", str(tmp_path / "again.yaml")])


def test_without_validation_rows_the_published_settings_are_used_and_select_scale_is_gone(tmp_path):
    tiny = build_setup(tmp_path, {"alpha": 3})
    config = write_config(tiny, tmp_path / "run")
    with pytest.warns(UserWarning, match="no val_files.*published defaults"):
        main(["merge", "--config", str(config), "--method", "ties"])
    report = json.loads((run_dir(tmp_path / "run") / "report.json").read_text())
    assert report["params"] == {"density": 0.2, "scale": 1.0, "scope": "model"}
    assert report["settings"]["chosen_on"] == "published defaults (no val_files)"
    with pytest.raises(ValueError, match="--select_scale is gone: it chose the scale on the rows the report"):
        main(["merge", "--config", str(config), "--method", "ties", "--select_scale", "0.5,1"])
