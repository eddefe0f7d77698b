"""What the ``polos`` commands print, through rich.

On a terminal: tables that fit its width (long text wraps in its column), colour (statuses,
failures, hints), a live status line while waiting. Piped or redirected: no escape code at all,
no wrapping, no truncation, no trailing blanks, so ``grep`` and ``awk`` see whole values.
``NO_COLOR`` (https://no-color.org) turns colour off on a terminal too; ``FORCE_COLOR`` and
``COLUMNS`` are honoured as rich honours them.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

Cell = str | Text

# Piped output is as wide as its longest line: nothing is cut for a terminal that is not there.
_UNBOUNDED = 1_000_000
# On a terminal: the narrowest a wrapping column gets, and the space between two columns.
_WRAP_MIN = 16
_GAP = 3

STATUS_STYLES = {
    "completed": "green",
    "failed": "bold red",
    "cancelled": "yellow",
    "running": "cyan",
    "suspended": "magenta",
    "queued": "blue",
    "unknown": "dim",
}


def console(file: IO[str] | None = None) -> Console:
    """A console on ``file`` (stdout by default), made per call: tests swap sys.stdout."""
    out = file if file is not None else sys.stdout
    probe = Console(file=out)
    if probe.is_terminal:
        return Console(file=out, highlight=False)
    return Console(
        file=out,
        highlight=False,
        width=_UNBOUNDED,
        no_color=True,
        color_system=None,
        soft_wrap=True,
    )


def err_console() -> Console:
    return console(sys.stderr)


def status(value: str) -> Text:
    """A run status, coloured by what it means."""
    return Text(value, style=STATUS_STYLES.get(value, ""))


def styled(value: str, style: str) -> Text:
    return Text(value, style=style)


def render(con: Console, renderable: Any) -> str:
    """``renderable`` as the text ``con`` would print (escape codes only on a terminal)."""
    with con.capture() as captured:
        con.print(renderable)
    text = captured.get()
    if not con.is_terminal:
        text = "\n".join(line.rstrip() for line in text.splitlines())
    return text.rstrip("\n")


def table(
    rows: Sequence[Sequence[Cell]],
    headers: Sequence[str],
    *,
    wrap: Collection[str] | None = None,
    file: IO[str] | None = None,
) -> str:
    """A table as text for stdout (or ``file``). On a terminal the columns named in ``wrap``
    (default: the last) wrap their text to fit the width; the others keep values whole, so an id
    can be copied from the screen. A terminal too narrow even for that gets the table at the
    width it needs (its lines wrap) rather than a table with values cut or columns dropped."""
    con = console(file)
    wrapping = set(wrap) if wrap is not None else {headers[-1]} if headers else set()
    cells = [[c if isinstance(c, Text) else Text(c) for c in r] for r in rows]
    tty = con.is_terminal
    t = Table(
        box=box.SIMPLE_HEAD if tty else None,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if tty else "",
        expand=False,
    )
    minimum = 0
    for i, h in enumerate(headers):
        longest = max([len(h), *(c[i].cell_len for c in cells if i < len(c))])
        least = min(longest, max(len(h), _WRAP_MIN)) if h in wrapping else longest
        minimum += least + _GAP
        # Plain strings became Text above, never markup: "[x]" in a value prints as it is.
        t.add_column(h, min_width=least, no_wrap=h not in wrapping, overflow="fold")
    for r in cells:
        t.add_row(*r)
    if tty and minimum > con.width:
        con = Console(file=con.file, highlight=False, width=minimum)
    return render(con, t)


def lines(
    text_lines: Sequence[str],
    *,
    highlights: Sequence[tuple[str, str]] = (),
    file: IO[str] | None = None,
) -> str:
    """Lines as text for stdout, each regular expression of ``highlights`` in its style (on a
    terminal; piped, the lines are returned as they are)."""
    con = console(file)
    if not con.is_terminal:
        return "\n".join(text_lines)
    out = Text()
    for i, line in enumerate(text_lines):
        t = Text(line)
        for pattern, style in highlights:
            t.highlight_regex(pattern, style)
        out.append(t)
        if i < len(text_lines) - 1:
            out.append("\n")
    return render(con, out)


def hint(message: str) -> None:
    """A line for the person at the terminal (dim, on stderr); nothing when stderr is piped,
    so scripts read only data."""
    con = err_console()
    if con.is_terminal:
        con.print(Text(message, style="dim"))


def error(message: str) -> None:
    """One line on stderr: ``error: message`` (red on a terminal)."""
    con = err_console()
    t = Text("error: ", style="bold red")
    t.append(message)
    con.print(t)


@contextmanager
def waiting(description: str) -> Iterator[Any]:
    """A spinner with the time waited, on stderr, while the block runs; yields a function that
    changes its text. Nothing is drawn when stderr is not a terminal."""
    con = err_console()
    if not con.is_terminal:
        yield lambda _text: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=con,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)
        yield lambda text: progress.update(task, description=text)


def is_terminal(file: IO[str] | None = None) -> bool:
    return console(file).is_terminal


__all__ = [
    "STATUS_STYLES",
    "Cell",
    "Text",
    "console",
    "err_console",
    "error",
    "hint",
    "is_terminal",
    "lines",
    "render",
    "status",
    "styled",
    "table",
    "waiting",
]
