"""The embedded demo: MiniLM and real text tasks from PyPI archives, experts fine-tuned here."""

from .datamodule import DemoDataModule

__all__ = ["DemoDataModule"]
