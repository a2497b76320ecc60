"""mkdocs hook: the CLI reference page, generated from the parser that `prunekit` itself runs.

`docs/cli.md` holds the region `<!-- cli-reference -->` ... `<!-- /cli-reference -->`; this hook fills it
with one section per command (its help line, description, usage and a table of every flag with its default
and help), read from `prunekit.cli.build_parser()`. The region is also committed, refreshed by running this
file, so the page reads on GitHub too; `tests/test_docs.py` fails when the committed copy is stale. The flags of most commands come from the typed options in `prunekit.options`,
so the page, `--help` and the options cannot disagree. Imports the `src/` beside `mkdocs.yml`, so the page
documents the tree being built, not an installed copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- cli-reference -->"
END = "<!-- /cli-reference -->"


def _import_cli(root: Path) -> Any:
    src = str(root / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from prunekit import cli
    from prunekit.options import COMMANDS

    return cli, COMMANDS


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        return ""
    d = action.default
    if d is None or d is argparse.SUPPRESS:
        return ""
    if isinstance(d, (tuple, list)):
        d = ",".join(str(x) for x in d)
    return f"`{d}`"


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}` (positional)"
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.choices and action.nargs != 0:
        names += " {" + ", ".join(str(c) for c in action.choices) + "}"
    elif action.nargs != 0 and action.metavar:
        names += f" `{action.metavar}`"
    return names


def _command(name: str, parser: argparse.ArgumentParser, help_line: str, options: dict[str, type]) -> list[str]:
    lines = [f"## prunekit {name}", "", _cell(help_line) + ".", ""]
    if parser.description:
        lines += [_cell(parser.description), ""]
    usage = parser.format_usage().strip().removeprefix("usage: ")
    lines += ["```text", usage, "```", ""]
    if name in options:
        cls = options[name]
        lines += [f"Options class: [`{cls.__name__}`](api.md#prunekit.options.{cls.__name__}) "
                  f"(the same fields in a recipe stage `command: {name}`).", ""]
    lines += ["| flag | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        help_text = parser._get_formatter()._expand_help(action) if action.help else ""  # as --help prints it
        lines.append(f"| {_flags(action)} | {_default(action)} | {_cell(help_text)} |")
    return lines + [""]


def render(root: Path) -> str:
    cli, options = _import_cli(root)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    index = ["| command | what it does |", "|---|---|"]
    index += [f"| [`prunekit {n}`](#prunekit-{n}) | {_cell(helps.get(n, ''))} |" for n in sub.choices]
    body: list[str] = []
    for name, p in sub.choices.items():
        body += _command(name, p, helps.get(name, ""), options)
    return "\n".join(index + [""] + body)


def rendered(text: str, root: Path) -> str:
    """`text` with the region between the two markers replaced by the reference generated now."""
    head, sep, rest = text.partition(MARKER)
    if not sep:
        return text
    _, end, tail = rest.partition(END)
    if not end:
        raise ValueError(f"{MARKER} without {END}")
    return f"{head}{MARKER}\n{render(root)}\n{END}{tail}"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return rendered(markdown, Path(config["config_file_path"]).resolve().parent)


if __name__ == "__main__":  # python docs/hooks/cli_reference.py: refresh the committed copy in docs/cli.md
    here = Path(__file__).resolve().parents[2]
    page = here / "docs" / "cli.md"
    page.write_text(rendered(page.read_text(), here))
