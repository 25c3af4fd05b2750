"""The `kvchunks` command."""

from __future__ import annotations

import sys

import click

from kvchunks.common import KVChunksError


class Group(click.Group):
    """Turns kvchunks' own errors into one clear line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KVChunksError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=Group)
def cli() -> None:
    """kvchunks: keep every piece of context as a reusable KV-cache chunk."""


@cli.group()
def model() -> None:
    """Manage models."""


@model.command("prepare")
@click.option("--force", is_flag=True, help="Convert again even if the model is already there.")
def model_prepare(force: bool) -> None:
    """Convert the default model (SmolLM2-135M-Instruct) to safetensors in the data directory."""
    from kvchunks.engine.checkpoint import prepare_default_model

    click.echo(prepare_default_model(force=force))


def main() -> None:
    cli()
