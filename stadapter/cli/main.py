"""The `stadapter` command. Each command group lives in its own module; bodies call library code."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from stadapter import __version__
from stadapter.cli import data, model, registry
from stadapter.cli import demo as demo_cli
from stadapter.cli import hub as hub_cli
from stadapter.cli import official as official_cli
from stadapter.cli import predict as predict_cli
from stadapter.cli import serve as serve_cli
from stadapter.cli import train as train_cli

# What a newcomer needs when a required option is missing, beyond the option's help (command, option).
MISSING_HINTS = {
    ("train", "train_annotations"): "It names your training clips: a text file with one `path label` line per "
                                    "clip (paths relative to the file), e.g. `stadapter train --task my-task "
                                    "--train train.txt --val val.txt`; README.md 'Quick start on your own clips' "
                                    "walks through it, and `stadapter demo` runs a complete example offline.",
}


class Group(TyperGroup):
    """The command group: a missing required option also says what the option expects (its help) and, for
    the first options a newcomer meets, where to start."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click Context
        try:
            return super().invoke(ctx)
        except typer.BadParameter as e:  # typer's (vendored) click raises MissingParameter, a BadParameter
            if type(e).__name__ == "MissingParameter" and e.param is not None and not e.message:
                command = (e.ctx.info_name if e.ctx is not None else None) or ""
                help_text = " ".join((getattr(e.param, "help", None) or "").split())
                e.message = " ".join(filter(None, [help_text, MISSING_HINTS.get((command, e.param.name or ""), "")]))
            raise


app = typer.Typer(
    name="stadapter",
    cls=Group,
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
app.command("import-official")(official_cli.import_official)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stadapter {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """stadapter command line."""
