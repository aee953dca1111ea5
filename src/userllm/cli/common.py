"""What every ``userllm`` command shares: the app, the consoles, the common options, and :func:`config_option`,
which gives an option the help text and default of the config field it sets (so ``--help`` and the
configs cannot disagree)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel
from rich.console import Console

from userllm.errors import UserError

app = typer.Typer(
    name="userllm",
    help="User-LLM: personalize LLMs with user embeddings (arXiv 2402.13598).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class OutputClosed(UserError):
    exit_code = 1


CLOSED = "the output pipe was closed before userllm finished writing (e.g. by `| head`)"


class StdoutConsole(Console):
    """rich exits silently with status 1 on a broken pipe; ours says why (see :func:`main`)."""

    def on_broken_pipe(self) -> None:
        raise OutputClosed(CLOSED)


out = StdoutConsole()
err = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file of config fields; flags override it")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override any config field: -s encoder.d_model=128 -s lr=1e-3 (YAML values)"),
]

ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue the run in --out from its last checkpoint")]
ForceRunOpt = Annotated[bool, typer.Option("--force", help="replace an existing run in --out")]


def parse_sets(sets: list[str] | None) -> dict:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE (e.g. encoder.d_model=128), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: the value is not valid YAML: {e}") from None
    return out


def config_field(model: type[BaseModel], dotted: str):
    """The pydantic field ``dotted`` (e.g. ``llm.strategy``) of a config model."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf]


def config_default(model: type[BaseModel], dotted: str) -> Any:
    """A config field's default (its factory's value for list and nested defaults)."""
    field = config_field(model, dotted)
    return field.default_factory() if field.default_factory is not None else field.default


def config_option(model: type[BaseModel], dotted: str, *decls: str, **kwargs) -> Any:
    """A typer option that sets config field ``dotted``: its help is the field's description and the
    default it shows is the config's (the option itself defaults to None: the config decides)."""
    field = config_field(model, dotted)
    default = config_default(model, dotted)
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return typer.Option(*decls, help=field.description, show_default=str(shown), **kwargs)
