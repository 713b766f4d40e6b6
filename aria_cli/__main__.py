"""`python -m aria_cli`: the same as the `aria` console script."""

from .main import app

app(prog_name="aria")
