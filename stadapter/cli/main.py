"""The `stadapter` command. Each command group lives in its own module; bodies call library code."""

from __future__ import annotations

import typer

from stadapter import __version__
from stadapter.cli import data, model, registry
from stadapter.cli import demo as demo_cli
from stadapter.cli import hub as hub_cli
from stadapter.cli import predict as predict_cli
from stadapter.cli import serve as serve_cli
from stadapter.cli import train as train_cli

app = typer.Typer(
    name="stadapter",
    help="One frozen ViT backbone, many video tasks: train ST-Adapters, version them, move them through the "
         "Hugging Face Hub, and serve them side by side.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

app.command("model-info")(model.model_info)
app.command("train")(train_cli.train)
app.command("eval")(train_cli.evaluate_cmd)
app.command("demo")(demo_cli.demo)
app.command("predict")(predict_cli.predict)
app.command("serve")(serve_cli.serve)
app.add_typer(data.app, name="data")
registry.register(app)  # db, ls, show, alias, rm, export, import, gc
hub_cli.register(app)  # push, pull


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stadapter {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """stadapter command line."""
