"""Progress bars and third-party notices, in one place: every bar of a run (tokenising, loading
and writing weights, the experts' outputs) follows the Trainer's ``enable_progress_bar``, so a
run with bars off prints none, whichever library draws them."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import datasets
import huggingface_hub.utils
import transformers.utils.logging
from lightning.pytorch import Trainer


def show_progress(trainer: Trainer | None) -> bool:
    """Bars are drawn when the Trainer draws its own (``enable_progress_bar``), on rank 0 only;
    without a Trainer (a module used from Python) they are drawn."""
    if trainer is None:
        return True
    return trainer.progress_bar_callback is not None and trainer.is_global_zero


def bars_enabled() -> bool:
    """Whether the libraries' bars are on now (transformers' switch covers the Hub's too)."""
    return transformers.utils.logging.is_progress_bar_enabled() and not datasets.are_progress_bars_disabled()


def set_progress_bars(enabled: bool) -> None:
    """Turn the bars of ``datasets`` (map, tokenising), ``transformers`` (loading and writing
    weights) and ``huggingface_hub`` on or off for this process. An ``HF_*_DISABLE_PROGRESS_BARS``
    environment variable still wins: the libraries warn about that, which we do not repeat."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot (en|dis)able progress bars")
        if enabled:
            datasets.enable_progress_bars()
            transformers.utils.logging.enable_progress_bar()  # the Hub's too
            huggingface_hub.utils.enable_progress_bars()
        else:
            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
            huggingface_hub.utils.disable_progress_bars()


def follow_trainer(trainer: Trainer | None) -> bool:
    """Set the libraries' bars as the Trainer's (called from the hooks that know it: the
    datamodule's and module's ``prepare_data`` and ``setup``); returns whether bars are shown."""
    shown = show_progress(trainer)
    set_progress_bars(shown)
    return shown


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """The libraries' bars on or off inside the block, as they were after it."""
    before = bars_enabled()
    set_progress_bars(enabled)
    try:
        yield
    finally:
        set_progress_bars(before)


class _DropAdvert(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger": an advert, logged by every Trainer (a
    compare builds one per method), about a service nothing here uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_DROP_ADVERT = _DropAdvert()


def filter_notices() -> None:
    """Hide third-party notices that tell a user of this package nothing they can act on. Each
    filter names the notice and says why it does not apply; called at the command's start
    (calling it again adds nothing)."""
    # Lightning: the frozen experts stay in eval mode on purpose (no dropout in teachers or merge).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Lightning's own code (utilities/_pytree.py) still builds torch's deprecated LeafSpec, once
    # per run: nothing a user of this package can change.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _DROP_ADVERT not in rank_zero_log.filters:
        rank_zero_log.addFilter(_DROP_ADVERT)
