"""DivMerge: merge fine-tuned experts by learning task-vector coefficients that keep the
merged model's outputs close (Jensen-Shannon) to each expert's on that task's own inputs."""

from .callbacks import BestOnValidation, CoefficientMonitor, MergedModelExport, MergeOnFitEnd
from .coefficients import CoefficientLayout, build_layout, initial_coefficients
from .data import MergeDataModule
from .divergences import OBJECTIVES, entropy, js_divergence, kl_divergence, masked_mean
from .experts import load_experts
from .merged import merge_tensors
from .module import DivMergeModule
from .preflight import ExpertMismatchError
from .tasks import TaskSpec

__all__ = [
    "OBJECTIVES",
    "CoefficientLayout",
    "BestOnValidation",
    "CoefficientMonitor",
    "DivMergeModule",
    "ExpertMismatchError",
    "MergeDataModule",
    "MergeOnFitEnd",
    "MergedModelExport",
    "TaskSpec",
    "build_layout",
    "entropy",
    "initial_coefficients",
    "js_divergence",
    "kl_divergence",
    "load_experts",
    "masked_mean",
    "merge_tensors",
]
