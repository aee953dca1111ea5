"""Typed configurations: every default of userllm, documented in one place.

Each stage has one pydantic model. A run resolves its config from (lowest to highest precedence):
the defaults below, an optional YAML file (``--config FILE``), and command-line flags. The resolved
config is saved beside every output (``config.yaml``) and inside ``manifest.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from userllm.errors import ConfigError

Source = Literal["movielens-100k", "movielens", "amazon", "google-local", "synthetic"]
SOURCES: tuple[str, ...] = Source.__args__  # type: ignore[attr-defined]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Config):
    """The seeded generator with planted structure (``--source synthetic``), used by tests and benchmarks."""

    num_users: int = Field(500, ge=1, description="number of users")
    num_items: int = Field(400, ge=2, description="number of items in the catalogue")
    num_genres: int = Field(8, ge=2, description="number of genres; each item has 1 or 2")
    mean_events: float = Field(40.0, gt=3, description="mean timeline length (Poisson, at least 5 events)")
    drift: float = Field(1.0, ge=0, le=1, description="how far preferences move from start to end (0 = static)")
    seed: int = Field(0, description="random seed; the same seed gives byte-identical data")


class PrepareConfig(_Config):
    """``userllm prepare``: raw logs -> a prepared dataset directory."""

    source: Source = Field("movielens-100k", description="reader to use")
    paths: list[Path] = Field(default_factory=list, description="input files or directories of the source")
    out: Path = Field(Path("outputs/dataset"), description="prepared dataset directory to create")
    max_history: int = Field(50, ge=1, description="events in the history window before each target")
    rating_threshold: float | None = Field(
        None, description="keep only events rated at least this (unrated events are dropped when set)"
    )
    min_user_events: int = Field(0, ge=0, description="k-core: users need at least this many events (0 = off)")
    min_item_events: int = Field(0, ge=0, description="k-core: items need at least this many events (0 = off)")
    rating_bucket: float = Field(0.5, gt=0, description="rating vocabulary: ratings rounded to this step")
    train_examples_per_user: int = Field(
        5, ge=0, description="labelled train examples per user: the last N targets of the train part"
    )
    strict: bool = Field(False, description="stop at the first malformed row instead of skipping it")
    force: bool = Field(False, description="replace an existing output directory")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


def load_config(cls: type[_Config], yaml_path: Path | None = None, overrides: dict[str, Any] | None = None):
    """Build ``cls`` from defaults, then a YAML file, then ``overrides`` (``None`` values are ignored).

    Nested fields are overridden with dotted keys, e.g. ``{"synthetic.num_users": 100}``.
    Raises :class:`ConfigError` naming the file and the field on any invalid value.
    """
    data: dict[str, Any] = {}
    where = "command line"
    if yaml_path is not None:
        where = f"{yaml_path} (or the command line)"
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {yaml_path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{yaml_path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of config fields, got {type(loaded).__name__}")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid configuration in {where}:"]
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


def dump_config(config: _Config) -> dict[str, Any]:
    """The config as plain JSON/YAML-serializable data."""
    return config.model_dump(mode="json")


def save_config(config: _Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
