from components.config import check_config, ConfigError, instantiate, parse
from components.training.schedules import cosine_warmup_decay, linear_warmup_decay
from components.training.stages import progressive_stages, resolve_stages, Stage, StageConfig

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
