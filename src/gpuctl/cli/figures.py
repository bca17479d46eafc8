"""What the `gpuctl simulate` benchmarks share: the --json option, and writing the figures."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import click

json_option = click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write the figures here as JSON.",
)


def write_figures(path: Path, figures: Mapping[str, object]) -> None:
    """`figures` as indented JSON at `path` (its folder made if missing), and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    click.echo(f"figures written to {path}")
