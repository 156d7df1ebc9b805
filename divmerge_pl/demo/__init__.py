"""The embedded demos: MiniLM (classification) or SmolLM2 (causal LM) and real text tasks from
PyPI archives, experts fine-tuned here."""

from .datamodule import DemoDataModule
from .lm import DemoLMDataModule

__all__ = ["DemoDataModule", "DemoLMDataModule"]
