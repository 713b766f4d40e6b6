"""The `aria` command line: Typer app, Rich rendering, chat REPL, model management."""
