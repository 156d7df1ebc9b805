"""Models given as Hub ids (``org/name[@revision]``), resolved from a hub cache laid out in
``tmp_path`` exactly as huggingface_hub writes one (``models--org--name/snapshots/<commit>``,
``refs/<branch or tag>`` holding the commit), offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from divmerge_pl.cli import main
from divmerge_pl.hub import is_hub_id, split_revision
from divmerge_pl.preflight import check_weight_format, resolve_model_dir

from .conftest import make_base
from .test_errors import no_model_loads  # noqa: F401 (fixture)
from .test_fit import run_dir, write_config

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def lay_out(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put a save_pretrained folder into ``cache`` as the snapshot ``commit`` of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline hub cache under ``HF_HOME`` (the default place, ``HF_HOME/hub``)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    return cache


def test_ids_and_revisions_are_told_from_paths():
    assert split_revision("org/name@v1.0") == ("org/name", "v1.0")
    assert split_revision("org/name") == ("org/name", None)
    assert is_hub_id("org/name") and is_hub_id("org/name@" + COMMIT_A) and is_hub_id("gpt2")
    for path in ("/abs/org/name", "~/models/base", "./org/name", "a/b/c", "org/name@", "org--x/y"):
        assert not is_hub_id(path), path


def test_fit_given_hub_ids_equals_fit_given_folders(tiny, hub_cache):
    folders = tiny.root / "by_folder"
    main(["fit", "--config", str(write_config(tiny, folders, epochs=1))])

    lay_out(hub_cache, "org/base", tiny.base, COMMIT_A)
    for task, folder in tiny.experts.items():
        lay_out(hub_cache, f"org/{task}", folder, COMMIT_B)
    config = write_config(tiny, tiny.root / "by_id", epochs=1)
    text = config.read_text().replace(str(tiny.root / "teacher_cache"), str(tiny.root / "teacher_cache_id"))
    for task, folder in tiny.experts.items():
        text = text.replace(str(folder), f"org/{task}")
    text = text.replace(f"base: {tiny.base}", "base: org/base")
    config.write_text(text)
    shutil.move(tiny.base, tiny.root / "base_moved")  # the id must not find the folder by chance
    main(["fit", "--config", str(config)])

    by_folder, by_id = run_dir(folders), run_dir(tiny.root / "by_id")
    coefficients = json.loads((by_id / "coefficients.json").read_text())
    assert coefficients == json.loads((by_folder / "coefficients.json").read_text())
    for task in tiny.experts:
        mine, reference = (load_file(r / "merged" / task / "model.safetensors") for r in (by_id, by_folder))
        assert mine.keys() == reference.keys()
        assert all(mine[n].equal(reference[n]) for n in mine)
    # teacher outputs are keyed by weight digests, not paths: the same keys either way
    cached = {p.name for p in (tiny.root / "teacher_cache").rglob("*") if p.is_file()}
    assert cached and cached == {p.name for p in (tiny.root / "teacher_cache_id").rglob("*") if p.is_file()}


def test_a_revision_picks_that_snapshot(tmp_path, hub_cache, monkeypatch):
    make_base(tmp_path / "v0", seed=0)
    make_base(tmp_path / "v1", seed=1)
    first = lay_out(hub_cache, "org/base", tmp_path / "v0", COMMIT_A, refs=("main",))
    second = lay_out(hub_cache, "org/base", tmp_path / "v1", COMMIT_B, refs=("v1.0",))
    assert resolve_model_dir("org/base", "model.base") == first
    assert resolve_model_dir(f"org/base@{COMMIT_A}", "model.base") == first
    assert resolve_model_dir(f"org/base@{COMMIT_B}", "model.base") == second
    assert resolve_model_dir("org/base@v1.0", "model.base") == second
    weights = [load_file(folder / "model.safetensors") for folder in (first, second)]
    name = "embeddings.word_embeddings.weight"
    assert not weights[0][name].equal(weights[1][name])  # truly the other model
    with pytest.raises(FileNotFoundError, match=r"model\.base: 'org/base@v2' .*revision 'v2'.*--revision v2"):
        resolve_model_dir("org/base@v2", "model.base")


def test_an_explicit_hub_cache_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    make_base(tmp_path / "v0")
    snapshot = lay_out(tmp_path / "elsewhere", "org/base", tmp_path / "v0", COMMIT_A)
    assert resolve_model_dir("org/base", "model.base") == snapshot


def test_a_local_folder_wins_over_the_id_it_spells(tmp_path, hub_cache, monkeypatch):
    make_base(tmp_path / "v0", seed=0)
    lay_out(hub_cache, "org/base", tmp_path / "v0", COMMIT_A)
    monkeypatch.chdir(tmp_path)
    make_base(tmp_path / "org" / "base", seed=1)
    assert resolve_model_dir("org/base", "model.base") == Path("org/base")


@pytest.mark.usefixtures("no_model_loads")
def test_an_unknown_id_offline_names_role_id_and_fix(tiny, hub_cache):
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_dir("org/missing", "expert 'beta'")
    message = str(info.value)
    for part in ("expert 'beta'", "'org/missing'", "HF_HUB_OFFLINE is set", "hf download org/missing"):
        assert part in message, (part, message)
    assert str(hub_cache) in message

    config = write_config(tiny, tiny.root / "run", epochs=1)
    config.write_text(config.read_text().replace(str(tiny.experts["beta"]), "org/missing"))
    with pytest.raises(FileNotFoundError, match=r"expert 'beta': 'org/missing' is not a local folder"):
        main(["fit", "--config", str(config)])


def test_the_command_leaves_hf_hub_offline_to_the_user(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    capsys.readouterr()
    assert "HF_HUB_OFFLINE" not in os.environ


def test_a_hub_model_without_safetensors_says_pickles_need_allow_pickle(tmp_path, hub_cache):
    make_base(tmp_path / "v0")
    snapshot = lay_out(hub_cache, "org/old", tmp_path / "v0", COMMIT_A)
    (snapshot / "model.safetensors").unlink()  # as a repository holding only pytorch_model.bin is fetched
    folder = resolve_model_dir("org/old", "model.base")
    with pytest.raises(FileNotFoundError, match=r"model\.base: .* holds no weights.*allow_pickle: true"):
        check_weight_format(folder, "model.base", allow_pickle=False)
