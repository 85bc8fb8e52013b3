"""Stages: a distillation run is a list of them, each naming its losses, what trains and at
which learning-rate multiplier, and how long it lasts. The recipe never special-cases a method:

* MiniALBERT: one stage with every loss.
* MobileBERT progressive transfer: stage k trains layer k only with its own layer-wise losses
  (``lr_scale`` 0 before, 3 during, 0.3 after), then a last stage trains everything.
* Quantisation-aware training: a last stage with ``fake_quantize: true``.

Parameter names are those of the recipe's trainable modules, prefixed ``student.`` or
``loss.`` (the hidden-state projection); patterns are ``fnmatch`` globs. To keep a parameter
fixed in a stage leave it out of ``trainable``: with ``lr_scale`` 0 AdamW still updates its
moment estimates from the gradients.
"""

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from omegaconf import OmegaConf
from torch import nn

from components.config import bounded, config_section, instantiate
from components.errors import ConfigError
from components.losses.distillation import LossTerm, MOBILEBERT_WEIGHTS


@dataclass
class StageConfig:
    """One stage of a run, as written in the config."""

    name: str = "distill"  # in logs and messages (metrics log the stage's index as "stage")
    # Optimizer steps in this stage; at most one stage may leave it out to take the rest.
    steps: Optional[int] = bounded(None, low=1)
    # Loss weights for this stage (missing terms weigh 0); null: the loss section's weights.
    loss_weights: Optional[Dict[LossTerm, float]] = None
    # Globs of parameters that train in this stage; the others are frozen.
    trainable: List[str] = field(default_factory=lambda: ["*"])
    # Learning-rate multipliers by glob, first match wins; unmatched parameters get 1.
    lr_scale: Dict[str, float] = field(default_factory=dict)
    # Quantisation-aware training: the student's Linear layers and word embeddings see the
    # integers of the run's quantization.scheme in this stage (fake quantisation).
    fake_quantize: bool = False
    # Student layers (1-based) whose mapped pairs the layer-wise losses cover in this stage;
    # null: every pair of the layer map (progressive transfer: [k] in phase k).
    layers: Optional[List[int]] = None


@dataclass
class Stage:
    name: str
    start: int  # first optimizer step (0-based) of the stage
    end: int  # one past its last step
    loss_weights: Optional[Dict[str, float]]
    trainable: Tuple[str, ...]
    lr_scale: Tuple[Tuple[str, float], ...]
    fake_quantize: bool = False
    layers: Optional[Tuple[int, ...]] = None

    def trains(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.trainable)

    def scale(self, name: str) -> float:
        return next((s for p, s in self.lr_scale if fnmatch.fnmatchcase(name, p)), 1.0)


def resolve_stages(configs: Optional[Sequence[Mapping]], total_steps: int) -> List[Stage]:
    """Lay the configured stages over ``total_steps`` optimizer steps."""
    configs = [StageConfig(**dict(c)) for c in configs] if configs else [StageConfig()]
    open_ended = [c for c in configs if c.steps is None]
    if len(open_ended) > 1:
        raise ValueError("Only one stage may leave out 'steps' (it takes the remaining steps)")
    fixed = sum(c.steps for c in configs if c.steps is not None)
    if open_ended:
        if total_steps - fixed < 1:
            raise ValueError(
                f"The stages with fixed lengths take {fixed} steps, leaving none of max_steps={total_steps} "
                f"for stage {open_ended[0].name!r}"
            )
        open_ended[0].steps = total_steps - fixed
    elif fixed != total_steps:
        raise ValueError(f"The stages last {fixed} steps in all but max_steps is {total_steps}")
    stages, start = [], 0
    for c in configs:
        stages.append(
            Stage(
                name=c.name,
                start=start,
                end=start + c.steps,
                loss_weights=dict(c.loss_weights) if c.loss_weights is not None else None,
                trainable=tuple(c.trainable),
                lr_scale=tuple((p, float(s)) for p, s in c.lr_scale.items()),
                fake_quantize=c.fake_quantize,
                layers=tuple(c.layers) if c.layers is not None else None,
            )
        )
        start += c.steps
    return stages


def check_stage_patterns(configs: Optional[Sequence[Mapping]], names: Sequence[str]) -> None:
    """Every ``trainable`` and ``lr_scale`` glob must match a parameter: a typo would otherwise
    freeze everything (and fail hours in) or scale nothing."""
    for i, c in enumerate(configs or []):
        c = StageConfig(**dict(c))
        for key, patterns in (("trainable", c.trainable), ("lr_scale", list(c.lr_scale))):
            for pattern in patterns:
                if pattern == "loss.*":  # the loss has parameters only for a teacher of another width
                    continue
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    prefixes = sorted({n.split(".")[0] + "." + n.split(".")[1] for n in names if n.count(".") > 1})
                    raise ValueError(
                        f"stages[{i}].{key}: {pattern!r} matches no parameter (names start with {prefixes})"
                    )


def progressive_stages(
    num_layers: int,
    steps_per_layer: int,
    layer_parameters: str = "student.blocks.{index}.*",
    also_trainable: Sequence[str] = ("loss.*",),
    layer_weights: Optional[Mapping[str, float]] = None,
    final_weights: Optional[Mapping[str, float]] = None,
    final_steps: Optional[int] = None,
    during: float = 3.0,
    after: float = 0.3,
) -> List[dict]:
    """MobileBERT's progressive knowledge transfer as a stage list (plain data; the resolved
    config shows every stage). Use it as ``stages: {_component_: components.training.progressive_stages, ...}``.

    Phase k (``layer_k``) trains student layer k and the layers before it, with only layer k's
    layer-wise losses (``layers: [k]``): learning-rate multiplier ``during`` (3) for layer k,
    ``after`` (0.3) for earlier layers; later layers, the embeddings and the MLM head are frozen
    (MobileBERT: multiplier 0 before a layer's phase, embeddings frozen while layers transfer).
    Then a last stage, ``pretrain_distill``, trains everything with ``final_weights``
    (MobileBERT's pre-training distillation ``0.5 * MLM + 0.5 * KD``).

    Args:
        num_layers: student layers (iterations) to transfer, in order.
        steps_per_layer: optimizer steps of each layer's phase.
        layer_parameters: glob of layer k's parameters, ``{index}`` being k - 1: the bottleneck
            student's ``student.blocks.{index}.*``; for a recursive student, whose per-iteration
            parameters are its adapters, ``student.adapters.{index}.*``.
        also_trainable: globs that train in every phase at multiplier 1 (the hidden-state
            projections of a teacher of another width, ``loss.*``; the shared layer of a
            recursive student, ``student.layer.*``).
        layer_weights: the layer-wise phases' loss weights (MobileBERT's by default).
        final_weights: the last stage's loss weights; ``{}`` leaves the last stage out.
        final_steps: the last stage's steps; ``None`` takes what remains of ``max_steps``.
        during, after: learning-rate multipliers of layer k during and after its phase.
    """
    if num_layers < 1 or steps_per_layer < 1:
        raise ValueError(
            f"progressive_stages needs num_layers >= 1 and steps_per_layer >= 1, got {num_layers}, {steps_per_layer}"
        )
    if "{index}" not in layer_parameters:
        raise ValueError(f"layer_parameters must contain '{{index}}' (the 0-based layer), got {layer_parameters!r}")
    layer_weights = dict(MOBILEBERT_WEIGHTS if layer_weights is None else layer_weights)
    final_weights = {"mlm": 0.5, "output": 0.5} if final_weights is None else dict(final_weights)
    stages = []
    for k in range(1, num_layers + 1):
        layer = [layer_parameters.format(index=i) for i in range(k)]
        scale = {layer[k - 1]: during, **{glob: after for glob in layer[: k - 1]}}
        stages.append(
            {
                "name": f"layer_{k}",
                "steps": steps_per_layer,
                "loss_weights": dict(layer_weights),
                "layers": [k],
                "trainable": layer + list(also_trainable),
                "lr_scale": scale,
            }
        )
    if final_weights:
        stages.append({"name": "pretrain_distill", "steps": final_steps, "loss_weights": final_weights})
    return stages


def expand_stages(cfg):
    """A ``stages`` section given as a ``_component_`` (a stage-list builder such as
    ``progressive_stages``) becomes the list it builds, before the config is checked."""
    node = cfg.get("stages") if hasattr(cfg, "get") else None
    if node is None or not OmegaConf.is_dict(node) or "_component_" not in node:
        return cfg
    with config_section("stages"):
        stages = instantiate(node)
    if not isinstance(stages, list):
        raise ConfigError(f"stages: {node._component_} returned {type(stages).__name__}, not a list of stages")
    cfg = cfg.copy()
    cfg.stages = stages
    return cfg


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
    for stage in stages:
        if stage.start <= step < stage.end:
            return stage
    return stages[-1]


def no_weight_decay(param) -> bool:
    """Biases and norm weights are not decayed (BERT's practice)."""
    return param.ndim < 2


def param_groups(
    named_params: Iterable[Tuple[str, nn.Parameter]], stages: Sequence[Stage], weight_decay: float
) -> List[dict]:
    """Optimizer parameter groups: parameters grouped by their per-stage LR multipliers and
    whether they decay. Each group carries ``lr_scales`` (one per stage) for the schedule."""
    groups: Dict[Tuple, dict] = {}
    for name, param in named_params:
        scales = tuple(stage.scale(name) for stage in stages)
        decays = not no_weight_decay(param)
        key = (scales, decays)
        group = groups.setdefault(
            key,
            {"params": [], "names": [], "weight_decay": weight_decay if decays else 0.0, "lr_scales": list(scales)},
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_trainable(named_params: Iterable[Tuple[str, nn.Parameter]], stage: Stage) -> None:
    for name, param in named_params:
        param.requires_grad_(stage.trains(name))


def group_lambdas(
    groups: Sequence[dict], stages: Sequence[Stage], schedule: Callable[[int], float]
) -> List[Callable[[int], float]]:
    """One LambdaLR function per group: the base schedule times the stage's multiplier."""

    def make(scales: Sequence[float]) -> Callable[[int], float]:
        return lambda step: schedule(step) * scales[stages.index(stage_at(stages, step))]

    return [make(g["lr_scales"]) for g in groups]
