"""The run configuration of dsa-train: one typed tree, loaded once, validated once.

``TrainRunConfig`` (``run.py``) has one section per concern -- ``model`` (:class:`dsa_dist.model.config.
DSAModelConfig`), ``parallel`` (``parallel.py``), ``data`` / ``train`` / ``optim`` / ``stages`` / ``checkpoint`` /
``logging`` (``train.py``) -- each a dataclass with a docstring under every field. :func:`load_config`
(``load.py``) builds it from defaults, the model preset, a YAML file and ``key=value`` overrides, derives
``parallel.dp`` and runs the section validators (``validate.py``). Checks that need the data on disk are
:func:`dsa_dist.train.data.check_data`. See docs/training.md#configuration.
"""

from dsa_dist.config.load import DEFAULT_CONFIG, load_config, resolve_config, to_yaml
from dsa_dist.config.parallel import ParallelConfig
from dsa_dist.config.run import STAGE_ORDER, StageName, TrainRunConfig, stage_value
from dsa_dist.config.train import (
    TASK_NAMES,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimConfig,
    StageOverrides,
    StagesConfig,
    TaskName,
    TrainConfig,
)
from dsa_dist.config.validate import SECTION_VALIDATORS, require, validate_config

__all__ = [
    "DEFAULT_CONFIG", "SECTION_VALIDATORS", "STAGE_ORDER", "TASK_NAMES", "CheckpointConfig", "DataConfig",
    "LoggingConfig", "OptimConfig", "ParallelConfig", "StageName", "StageOverrides", "StagesConfig", "TaskName",
    "TrainConfig", "TrainRunConfig", "load_config", "require", "resolve_config", "stage_value", "to_yaml",
    "validate_config",
]
