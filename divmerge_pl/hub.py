"""Models and datasets named by Hub id (``org/name``, or ``org/name@revision`` for a branch, tag
or commit), resolved with huggingface_hub into the user's own cache: every later step works on
the local snapshot folder, exactly as on a folder the user gave.

The environment is read when an id is resolved, not when huggingface_hub was imported, so
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_HOME`` set by the caller (or a test) are honoured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

RepoType = Literal["model", "dataset"]

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
"""What a merge reads from a model repository: config, weights (and their index) and tokenizer
files (tokenizer.json, vocab.txt, merges.txt, sentencepiece models), never pickles by default."""
PICKLE_FILES = ["*.bin", "*.pt", "*.pth"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def split_revision(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); a Hub id never holds ``@``."""
    repo_id, at, revision = ref.partition("@")
    return repo_id, (revision or None) if at else None


def is_hub_id(ref: str) -> bool:
    """Could ``ref`` name a Hub repository (``name`` or ``org/name``, optionally ``@revision``)?
    Paths that are plainly paths (absolute, ``~``, ``./``) are never taken for ids."""
    if not ref or ref.startswith(("/", "~", ".")) or "\\" in ref:
        return False
    repo_id, revision = split_revision(ref)
    if "@" in ref and not revision:
        return False
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    """The user's ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is None:
        return constants.HF_HUB_OFFLINE
    return value.strip().upper() in _TRUE


def hub_cache_dir() -> Path:
    """The user's hub cache, read now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _download_hint(repo_id: str, revision: str | None, repo_type: RepoType) -> str:
    options = (f" --revision {revision}" if revision else "") + (
        " --repo-type dataset" if repo_type == "dataset" else ""
    )
    return f"`hf download {repo_id}{options}`"


def snapshot(
    ref: str, role: str, repo_type: RepoType = "model", allow_patterns: list[str] | None = None
) -> Path:
    """The local snapshot folder of Hub id ``ref`` (downloaded into the cache unless offline);
    the error names ``role``, the id, why it cannot be had and what to do."""
    repo_id, revision = split_revision(ref)
    offline = hub_offline()
    cache = hub_cache_dir()
    what = f"Hub {repo_type} {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=allow_patterns,
        )
    except RevisionNotFoundError as err:
        raise FileNotFoundError(
            f"{role}: {what} does not exist (no such branch, tag or commit); give an existing revision "
            f"after '@', or none for the default branch"
        ) from err
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise FileNotFoundError(
            f"{role}: {ref!r} is not a local folder, and the Hub has no {repo_type} {repo_id!r} you can "
            "read (a typo, or a private or gated repository: log in with `hf auth login`)"
        ) from err
    except LocalEntryNotFoundError as err:
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached (no network?)"
        raise FileNotFoundError(
            f"{role}: {ref!r} is not a local folder, and {what} is not in the cache {str(cache)!r} "
            f"while {reason}. Download it once with {_download_hint(repo_id, revision, repo_type)} "
            "(where there is network; set HF_HUB_CACHE or HF_HOME to the same cache here), or give "
            "the path of a local folder"
        ) from err
    return Path(folder)


def local_or_snapshot(ref: str, role: str, allow_patterns: list[str] | None = MODEL_FILES) -> Path:
    """A folder that exists always wins; otherwise a Hub id is resolved to its snapshot folder."""
    folder = Path(ref).expanduser()
    if folder.is_dir() or not is_hub_id(ref):
        return folder
    return snapshot(ref, role, "model", allow_patterns)
