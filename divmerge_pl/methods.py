"""The one registry of merge methods, each with its own published settings.

A method is data: a training-free one names its merge function's defaults and the grid it
chooses its scale (and density) from on a labelled validation split; a learned one names its
objective, coefficient layout, vector transform, optimiser settings, clamp and epochs. Every
default follows a source, given in ``reference``; a user overrides any of them (``--method_args``
of ``divmerge-pl merge`` / ``compare``), and a run records what it used.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .coefficients import Granularity
from .static_merges import STATIC_MERGES, StaticMerge, build_static_merge

Objective = Literal["js", "kl", "entropy"]
Transform = Literal["none", "ties", "dare", "tsv"]


@dataclass(frozen=True)
class StaticMethod:
    """A training-free merge: its parameters, and the grid it picks from on labelled validation
    rows (``data.tasks[*].val_files``) when there are some; without them, ``params`` as published."""

    name: str
    params: dict[str, Any]
    grid: dict[str, list[Any]]  # values of any of its params (scale, density, scope...)
    reference: str
    kind: Literal["static"] = "static"

    def build(self, **params: Any) -> StaticMerge:
        return build_static_merge(self.name, **{**self.params, **params})

    def candidates(self) -> list[dict[str, Any]]:
        """Every point of the grid, as parameters over ``params`` (one, ``{}``, without a grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]

    def with_overrides(self, overrides: dict[str, Any]) -> StaticMethod:
        """``params`` overridden; a parameter given explicitly is no longer chosen on validation."""
        allowed = set(STATIC_MERGES[self.name].__dataclass_fields__) | {"grid"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(f"{self.name}: unknown setting(s) {unknown}; it takes {sorted(allowed)}")
        grid = dict(overrides.get("grid", self.grid))
        params = {k: v for k, v in overrides.items() if k != "grid"}
        for key in params:
            grid.pop(key, None)
        method = replace(self, params={**self.params, **params}, grid=grid)
        method.build()  # bad values fail now, named, before any model loads
        return method

    def settings(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "params": dict(self.params),
            "grid": dict(self.grid),
            "reference": self.reference,
        }


@dataclass(frozen=True)
class LearnedMethod:
    """A learned merge: ``DivMergeModule`` options and the number of epochs."""

    name: str
    objective: Objective
    granularity: Granularity
    task_vector_transform: Transform
    lr: float
    init: float | None  # None: 1/N
    clamp: tuple[float, float] | None
    epochs: int
    reference: str
    density: float = 0.2  # ties transform (TIES paper's k = 20%)
    drop_rate: float = 0.9  # dare transform (DARE paper's p = 0.9)
    kind: Literal["learned"] = "learned"
    extra: dict[str, Any] = field(default_factory=dict)

    MODEL_KEYS = (
        "objective",
        "granularity",
        "task_vector_transform",
        "lr",
        "init",
        "clamp",
        "density",
        "drop_rate",
    )

    def model_options(self) -> dict[str, Any]:
        """What this method sets in ``model.init_args`` (and nothing else)."""
        options = {key: getattr(self, key) for key in self.MODEL_KEYS}
        options["clamp"] = None if self.clamp is None else list(self.clamp)
        return {**options, **self.extra}

    def with_overrides(self, overrides: dict[str, Any]) -> LearnedMethod:
        known = {k: v for k, v in overrides.items() if k in (*self.MODEL_KEYS, "epochs")}
        clamp = known.get("clamp", self.clamp)
        known["clamp"] = None if clamp is None else tuple(float(x) for x in clamp)
        extra = {k: v for k, v in overrides.items() if k not in known}
        return replace(self, **known, extra={**self.extra, **extra})

    def settings(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("name")
        values.update(self.extra)
        values.pop("extra")
        values["clamp"] = None if self.clamp is None else list(self.clamp)
        return values


Method = StaticMethod | LearnedMethod

TA_SCALES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
_STATIC = [
    StaticMethod("average", {}, {}, "uniform weight averaging (Wortsman et al. 2022, model soups)"),
    StaticMethod(
        "task_arithmetic",
        {"scale": 0.3},
        {"scale": TA_SCALES},
        "Ilharco et al. 2023: scale chosen on validation from 0.1..1.0 (0.3 without validation data)",
    ),
    StaticMethod(
        "ties",
        {"density": 0.2, "scale": 1.0, "scope": "model"},
        {"density": [0.1, 0.2, 0.3], "scale": [0.8, 1.0, 1.2, 1.4, 1.6, 1.8]},
        "Yadav et al. 2023: trim over the whole task vector, k = 20%, lambda = 1; with validation "
        "data k in {10, 20, 30}% and lambda in 0.8..1.8 (the paper's grid)",
    ),
    StaticMethod(
        "dare",
        {"drop_rate": 0.9, "then": "task_arithmetic", "scale": 0.3, "density": 1.0, "seed": 0},
        {"scale": TA_SCALES},
        "Yu et al. 2024: drop p = 0.9 and rescale, then task arithmetic with its scale chosen on validation",
    ),
    StaticMethod(
        "tsv",
        {"scale": 1.0},
        {"scale": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0]},
        "Gargiulo et al. 2025 (Task Singular Vectors): each task's top 1/N singular vectors of every "
        "matrix, made orthogonal across tasks, summed; alpha = 1 as published, with validation data "
        "alpha in 0.5..3.0",
    ),
]

_DIVMERGE = (
    "DivMerge (Touayouch et al. 2026): Adam lr 1e-2, 4 epochs, init 1/N as in its Algorithm 1 "
    "(its Table 9 says 0.5: the same at N = 2), coefficients unconstrained"
)
_ADAMERGING = (
    "AdaMerging (Yang et al., ICLR 2024) and its official code: Adam lr 1e-3, prior 0.3, coefficients "
    "clamped to [0, 1]; 5 epochs as in DivMerge's Table 9"
)
_FAMILIES: dict[str, dict[str, Any]] = {
    "divmerge": dict(objective="js", lr=1e-2, init=None, clamp=None, epochs=4, reference=_DIVMERGE),
    "divmerge_kl": dict(
        objective="kl", lr=1e-2, init=None, clamp=None, epochs=4, reference=_DIVMERGE + "; forward KL variant"
    ),
    "adamerging": dict(
        objective="entropy", lr=1e-3, init=0.3, clamp=(0.0, 1.0), epochs=5, reference=_ADAMERGING
    ),
}
# the module's defaults of the options only variants set (a run without them is the paper's)
VARIANT_DEFAULTS: dict[str, Any] = {"task_weighting": "sum", "teacher_temperature": 1.0}
# Beyond the paper (this project's variants; the paper-faithful divmerge* stay as published)
_BALANCED = (
    _DIVMERGE.split(":")[0] + "'s settings with each task's divergence weighted by the inverse of its "
    "value at the initial coefficients (divmerge-pl's variant: unsure experts' tasks are not given up)"
)
_SHARPENED = (
    _DIVMERGE.split(":")[0] + "'s settings with the experts' targets sharpened, softmax(log p / 0.5) "
    "(divmerge-pl's variant, no labels used)"
)
_FAMILIES["balanced"] = dict(_FAMILIES["divmerge"], reference=_BALANCED, extra={"task_weighting": "relative"})
_FAMILIES["sharpened"] = dict(_FAMILIES["divmerge"], reference=_SHARPENED, extra={"teacher_temperature": 0.5})
_TRANSFORMS = {"": "none", "_ties": "ties", "_dare": "dare", "_tsv": "tsv"}
CHANNEL = (
    "one coefficient per task per row (output channel) of every merged tensor instead of per tensor "
    "(divmerge-pl's variant: every channel keeps the experts it serves)"
)

TSV_START = (
    "init 1: starts at TSV-Merge (each task's decorrelated part at its published alpha = 1), not at "
    "1/N of parts that are made to be summed (divmerge-pl's variant)"
)


def _learned() -> list[LearnedMethod]:
    methods = []
    for family, defaults in _FAMILIES.items():
        for granularity in ("task", "layer", "block", "channel"):
            for suffix, transform in _TRANSFORMS.items():
                names = [f"{family}_{granularity}{suffix}"]
                if granularity == "layer":  # the family's default layout: AdaMerging's layer-wise
                    names.append(f"{family}{suffix}")
                reference = defaults["reference"] + (
                    f"; coefficients over {transform.upper()}-processed task vectors (AdaMerging++)"
                    if transform != "none"
                    else ""
                )
                if granularity == "channel":
                    reference += f"; {CHANNEL}"
                start = {}
                if transform == "tsv":  # the parts are made to be summed: start at TSV-Merge itself
                    start = {"init": 1.0}
                    reference += f"; {TSV_START}"
                for name in names:
                    methods.append(
                        LearnedMethod(
                            name,
                            granularity=granularity,
                            task_vector_transform=transform,
                            **{**defaults, **start, "reference": reference},
                        )  # fmt: skip
                    )
    return methods


METHODS: dict[str, Method] = {m.name: m for m in [*_STATIC, *_learned()]}
DEFAULT_METHODS = (
    "average,task_arithmetic,ties,dare,tsv,adamerging_task,adamerging_layer,adamerging_layer_ties,"
    "divmerge_task,divmerge_layer,divmerge_block"
)


def get_method(name: str, overrides: dict[str, Any] | None = None) -> Method:
    """The registry's ``name`` with ``overrides``; an unknown name lists what there is."""
    if name not in METHODS:
        learned = sorted(n for n, m in METHODS.items() if m.kind == "learned" and n.count("_") <= 1)
        raise ValueError(
            f"unknown method {name!r}: choose a training-free one "
            f"({', '.join(m.name for m in _STATIC)}) or a "
            f"learned one ({', '.join(learned)}, with _task|_layer|_block and optionally _ties|_dare, e.g. "
            "divmerge_task_ties)"
        )
    method = METHODS[name]
    return method.with_overrides(overrides) if overrides else method


def learned_name(options: dict[str, Any], epochs: int | None) -> str | None:
    """The registry's name for a learned run with these model options (None: settings of one's own)."""
    options = {**VARIANT_DEFAULTS, **options}
    for method in METHODS.values():  # a layout's explicit name (divmerge_layer) comes before its alias
        if method.kind != "learned":
            continue
        mine = {**VARIANT_DEFAULTS, **method.model_options()}
        if all(_same(options.get(k), v) for k, v in mine.items()) and (
            epochs is None or epochs == method.epochs
        ):
            return method.name
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def learned_label(options: dict[str, Any], epochs: int | None) -> str:
    """How reports name a learned run: the registry's name when its settings are exactly one
    of its methods', else what it is."""
    name = learned_name(options, epochs)
    if name is not None:
        return name
    transform = options["task_vector_transform"]
    suffix = "" if transform == "none" else f" over {transform} vectors"
    return f"learned ({options['objective']}, {options['granularity']}){suffix}, own settings"


def learned_settings(options: dict[str, Any], num_tasks: int) -> dict[str, Any]:
    """Every model option that defines a learned merge, resolved (init 1/N as a number)."""
    h = options
    settings = {
        "kind": "learned",
        "objective": h["objective"],
        "granularity": h["granularity"],
        "task_vector_transform": h["task_vector_transform"],
        "lr": h["lr"],
        "init": 1.0 / num_tasks if h["init"] is None else h["init"],
        "init_rule": "1/N" if h["init"] is None else "fixed",
        "clamp": None if h["clamp"] is None else list(h["clamp"]),
        "task_vector_dtype": h["task_vector_dtype"],
    }
    if h["granularity"] == "block":
        settings["block_pattern"] = h["block_pattern"]
    if h["task_vector_transform"] == "ties":
        settings.update(density=h["density"], trim_scope=h["trim_scope"])
    if h["task_vector_transform"] == "dare":
        settings.update(drop_rate=h["drop_rate"], transform_seed=h["transform_seed"])
    return settings
