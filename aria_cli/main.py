"""Entry point of the `aria` command (filled in by the CLI work)."""

import typer

app = typer.Typer(help="Ask the Aria multimodal model about your images.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the version."""
    from importlib.metadata import version as _v

    typer.echo(_v("aria-cli"))
