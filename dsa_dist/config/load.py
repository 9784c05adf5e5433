"""Building a run config: defaults <- preset <- YAML file <- ``key=value`` overrides, resolved, then validated.

:func:`load_config` is the one entry point. Its steps, in order:

1. read the YAML file (syntax errors name the file and line; the top level must be a mapping);
2. pick the model preset (``model_preset``, the last layer that sets it wins) as the model section's defaults;
3. merge the layers with OmegaConf onto the typed schema (unknown keys, wrong types and a section given a plain
   value are errors naming the key);
4. :func:`resolve_config`: derive ``parallel.dp`` from the world size -- the only derived value;
5. :func:`dsa_dist.config.validate.validate_config`: every rule, pure.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dsa_dist.config.run import TrainRunConfig
from dsa_dist.config.validate import validate_config, validate_device
from dsa_dist.model.config import PRESET_NAMES, preset

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
"""The config ``dsa-train`` runs without arguments: the tiny model on CPU."""

_DOC = "docs/training.md#configuration"


def _read_yaml(path: Path) -> DictConfig:
    """The YAML file as a DictConfig; ``ValueError`` naming file and line for syntax errors and duplicate keys."""
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist" if not path.exists()
                         else f"config file {path} is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # syntax and the shape of the top level
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections (run_dir:, model:, train:, ...),"
                             f" got a {type(data).__name__}")
        loaded = OmegaConf.load(path)  # OmegaConf's YAML dialect: 1e-3 is a float, duplicate keys are errors
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, cmark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and cmark is not None:
            problem += f" ({context} that starts at line {cmark.line + 1})"
        raise ValueError(f"{where}: YAML syntax error: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path} cannot be read: {err}") from None
    except OmegaConfBaseException as err:
        raise ValueError(f"{path}: {str(err).splitlines()[0]}") from None
    assert isinstance(loaded, DictConfig)  # a mapping at the top level was checked above
    return loaded


def _check_shapes(layer: dict, schema: DictConfig, source: str, prefix: str = "") -> None:
    """A section must get a mapping and a list field a list: ``model=5`` or ``pipeline=dense`` name the key.

    OmegaConf's own messages for these cases lose the key (``'?': None``) or name its internal node types.
    """
    for key, value in layer.items():
        if not isinstance(key, str) or key not in schema:
            continue  # unknown keys are reported by the merge, with the valid keys listed
        sub, path = schema._get_node(key), f"{prefix}{key}"
        if isinstance(sub, DictConfig):
            if not isinstance(value, dict):
                fields = ", ".join(str(k) for k in sub.keys())
                raise ValueError(f"{source}: '{path}' is a config section, not a value (got {value!r}); set its "
                                 f"fields instead, e.g. {path}.{next(iter(sub.keys()), 'field')}=... "
                                 f"(fields: {fields})")
            _check_shapes(value, sub, source, f"{path}.")
        elif isinstance(sub, ListConfig) and value is not None and not isinstance(value, list):
            example = ",".join(str(v) for v in sub) or "a,b"
            raise ValueError(f"{source}: '{path}' takes a list (got {value!r}); write it as {path}=[{example}] "
                             "on the command line or as a YAML list")


def _as_value_error(err: OmegaConfBaseException, source: str, root: DictConfig) -> ValueError:
    key = err.full_key or ""
    reason = str(getattr(err, "msg", err)).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(root, parent) if parent else root
        where = f"under '{parent}'" if parent else "at the top level"
        valid = ", ".join(str(k) for k in node.keys()) if isinstance(node, DictConfig) else ""
        return ValueError(f"{source}: unknown config key '{key}'; valid keys {where}: {valid}")
    if not key:
        return ValueError(f"{source}: {reason}. See {_DOC}")
    return ValueError(f"{source}: bad value for '{key}': {reason}. Fix: give a value of the documented type "
                      f"(see {_DOC})")


def _select_preset(layers: list[tuple[str, DictConfig]]) -> str:
    name = "tiny"
    for _, cfg in layers:
        value = cfg.get("model_preset", None)
        if value is not None:
            name = str(value)
    if name not in PRESET_NAMES:
        raise ValueError(f"model_preset={name!r} is not a model preset; choose one of {list(PRESET_NAMES)}")
    return name


def _world_size_from_env() -> int | None:
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"environment WORLD_SIZE={raw!r} is not a positive integer (set by torchrun/the launcher)")
    return int(raw)


def resolve_config(cfg: TrainRunConfig, world_size: int | None = None) -> TrainRunConfig:
    """A copy of ``cfg`` with ``parallel.dp`` derived from ``world_size`` (None: tp*cp*pp*max(dp, 1)).

    ``ValueError`` when the sizes cannot multiply out to the world size.
    """
    p = cfg.parallel
    for name in ("tp", "cp", "pp"):
        if getattr(p, name) < 1:
            raise ValueError(f"parallel.{name}={getattr(p, name)!r}: must be >= 1")
    if p.dp < 0:
        raise ValueError(f"parallel.dp={p.dp!r}: must be >= 1, or 0 to derive it from the world size")
    mp = p.model_parallel_size
    world = mp * max(p.dp, 1) if world_size is None else world_size
    dp = p.dp
    if dp == 0:
        if world % mp:
            raise ValueError(f"parallel.tp*cp*pp={mp!r}: does not divide the world size {world}; launch a multiple "
                             f"of {mp} processes")
        dp = world // mp
    if mp * dp != world:
        raise ValueError(f"parallel.dp={dp!r}: world size {world} != tp*cp*pp*dp = {p.tp}*{p.cp}*{p.pp}*{dp} = "
                         f"{mp * dp}; set parallel.dp={world // mp if world % mp == 0 else 0} (0 derives it) or "
                         f"launch {mp * dp} processes")
    return dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp=dp))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                world_size: int | None = None) -> TrainRunConfig:
    """Defaults <- YAML ``path`` (None: no file) <- ``overrides`` (``a.b=c``), resolved and validated.

    ``world_size`` defaults to ``$WORLD_SIZE`` when set (torchrun), else to tp*cp*pp*dp of the config
    (dsa-train then starts that many local processes). Every problem is a ``ValueError`` naming the source,
    the key path, the bad value and the fix.
    """
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"override {bad[0]!r} is not of the form key=value (e.g. train.steps=50)")
    if overrides:
        try:
            layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ValueError(f"command line: cannot parse the overrides {list(overrides)}: "
                             f"{str(err).splitlines()[0]}") from None
    model_preset = _select_preset(layers)
    schema = OmegaConf.structured(TrainRunConfig(model_preset=model_preset, model=preset(model_preset)))
    merged = schema
    for source, layer in layers:
        _check_shapes(_container(layer), schema, source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            raise _as_value_error(err, source, merged) from None
    try:
        cfg: TrainRunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _as_value_error(err, "config", merged) from None
    cfg = resolve_config(cfg, _world_size_from_env() if world_size is None else world_size)
    validate_config(cfg)
    validate_device(cfg, cuda_available=_cuda_available())
    return cfg


def _container(layer: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(layer, resolve=False)  # type: ignore[return-value]


def to_yaml(cfg: TrainRunConfig) -> str:
    """The resolved config as YAML (written to <run_dir>/config.yaml; loads back to the same config)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
