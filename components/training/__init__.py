from components.training.config import check_config, ConfigError, instantiate, parse
from components.training.stages import (
    cosine_warmup_decay,
    linear_warmup_decay,
    progressive_stages,
    resolve_stages,
    Stage,
    StageConfig,
)

__all__ = [
    "check_config",
    "ConfigError",
    "cosine_warmup_decay",
    "instantiate",
    "linear_warmup_decay",
    "progressive_stages",
    "parse",
    "resolve_stages",
    "Stage",
    "StageConfig",
]
