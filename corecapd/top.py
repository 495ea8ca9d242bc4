"""`corecapctl top`: one host's core budgets on one live screen, like htop.

Two halves. `render(view, width, height)` is pure: the daemon's `status` reply (and its
`explain` reply for the selected job) in, a `rich.text.Text` of at most `height` lines of
at most `width` cells out, with no clock read, no terminal and no socket; `rows` orders the
jobs, `keys` turns the bytes a terminal sends into key names and `move` the selection. `run`
is the edge: it asks the daemon, reads the keyboard and redraws.

Why rich, and not textual: top is one screen redrawn every few seconds and a handful of
keys. rich's `Live` gives what that needs (the alternate screen, the cursor hidden, the
terminal's size, colour or none as the terminal and NO_COLOR say) and its `Text` carries
styles without markup parsing, so a name a job chose is never read as markup. Reading keys
takes a few lines of termios (cbreak mode: keys one by one, no echo, ^C still interrupts).
textual would bring an application framework and an event loop for this, and Debian 12
ships python3-textual 0.1.13, far behind the API of today, while its python3-rich (13.3)
has all of the above: the Debian package depends on python3-rich.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import string
import sys
import termios
import time
import tty
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from corecapd.client import DaemonUnreachable
from corecapd.cpulist import format_cpulist
from corecapd.printable import visible
from corecapd.protocol import ProtocolError, RemoteError

# A job's glyph in the CPU map, by ascending PID; "+" for each job past the 62nd.
GLYPHS = string.ascii_uppercase + string.ascii_lowercase + string.digits
MORE = "+"
SHARED, FREE, RESERVED, NOT_FOR_JOBS = "=", ".", "r", "-"
# Colours of jobs within budget, by glyph; over budget is yellow, a violation red.
PALETTE = ("cyan", "green", "magenta", "blue", "bright_cyan", "bright_green", "bright_magenta")
VIOLATION_STYLE = "bold white on red"
OVER_STYLE = "bold yellow"
BAR_MIN, BAR_MAX = 8, 32  # cells of a job's bar, brackets included

Document = Mapping[str, Any]


@dataclass(frozen=True)
class View:
    """What one frame shows."""

    status: Document | None  # the daemon's `status` reply; None when it did not answer
    selected: int | None = None  # PID of the selected job; None or gone: the first row
    detail: Document | None = None  # the daemon's `explain` reply for the selected job
    error: str | None = None  # why the last refresh failed
    clock: str = ""  # when `status` was read, as shown in the title
    interval: float = 2.0  # seconds between refreshes
    live: bool = True  # False (--once): no key help, no padding to the bottom


@dataclass(frozen=True)
class Row:
    """A job in the order shown: `depth` 1 and more for a sub-job under its parent."""

    job: Document
    depth: int
    glyph: str

    @property
    def pid(self) -> int:
        return int(self.job["pid"])

    @property
    def over(self) -> int:
        """Threads over budget (negative: under)."""
        return int(self.job["threads"]) - int(self.job["budget"])

    @property
    def violating(self) -> bool:
        return bool(self.job.get("state") == "violation")

    @property
    def style(self) -> str:
        if self.violating:
            return VIOLATION_STYLE
        if self.over > 0:
            return OVER_STYLE
        return PALETTE[GLYPHS.find(self.glyph) % len(PALETTE)] if self.glyph in GLYPHS else ""


def rows(jobs: Sequence[Document]) -> list[Row]:
    """The jobs in the order shown: families (a job and its sub-jobs, by the `parent`
    field status gives a sub-job: its parent's PID) most over budget first, each sub-job
    right under its parent; within a family, the same order. A `parent` that is not
    among `jobs` (or a loop of parents) leaves the job at the top level."""
    by_pid = {int(job["pid"]): job for job in jobs}
    glyphs = {pid: GLYPHS[i] if i < len(GLYPHS) else MORE for i, pid in enumerate(sorted(by_pid))}
    children: dict[int | None, list[int]] = {}
    for pid, job in by_pid.items():
        children.setdefault(_parent(job, pid, by_pid), []).append(pid)

    def urgency(pid: int) -> tuple[int, bool, int]:
        job = by_pid[pid]
        return (int(job["budget"]) - int(job["threads"]), job.get("state") != "violation", pid)

    def family(pid: int, seen: frozenset[int]) -> list[int]:
        below = [child for child in children.get(pid, []) if child not in seen]
        return [pid, *(p for child in below for p in family(child, seen | {pid}))]

    def worst(pid: int) -> tuple[int, bool, int]:
        return min(urgency(p) for p in family(pid, frozenset()))

    ordered: list[Row] = []

    def emit(pid: int, depth: int, seen: frozenset[int]) -> None:
        ordered.append(Row(by_pid[pid], depth, glyphs[pid]))
        for child in sorted(children.get(pid, []), key=urgency):
            if child not in seen:
                emit(child, depth + 1, seen | {pid})

    for root in sorted(children.get(None, []), key=worst):
        emit(root, 0, frozenset())
    shown = {row.pid for row in ordered}
    for pid in sorted(set(by_pid) - shown, key=urgency):  # parents in a loop
        if pid not in shown:
            before = len(ordered)
            emit(pid, 0, frozenset())
            shown |= {row.pid for row in ordered[before:]}
    return ordered


def _parent(job: Document, pid: int, by_pid: Mapping[int, Document]) -> int | None:
    """The parent job's PID, if it is one of the jobs: an int, or a name "<pid>-<ticks>"."""
    parent = job.get("parent")
    if isinstance(parent, Mapping):
        parent = parent.get("pid")
    if isinstance(parent, str):
        head = parent.partition("-")[0]
        parent = int(head) if head.isascii() and head.isdigit() and len(head) < 12 else None
    if isinstance(parent, int) and not isinstance(parent, bool):
        return parent if parent in by_pid and parent != pid else None
    return None


def keys(data: bytes) -> list[str]:
    """Key names in what the terminal sent: "up", "down", "page-up", "page-down", "home",
    "end", "quit"; other keys and escape sequences are skipped."""
    found = []
    at = 0
    while at < len(data):
        for sequence, name in _KEYS:
            if data.startswith(sequence, at):
                found.append(name)
                at += len(sequence)
                break
        else:
            at = _past_escape(data, at) if data[at] == 0x1B else at + 1
    return found


# Longest first: "\x1b[A" before a lone "\x1b". Arrows come as CSI or SS3 (application mode).
_KEYS = sorted(
    {
        b"\x1b[A": "up",
        b"\x1bOA": "up",
        b"k": "up",
        b"\x1b[B": "down",
        b"\x1bOB": "down",
        b"j": "down",
        b"\x1b[5~": "page-up",
        b"\x1b[6~": "page-down",
        b"\x1b[H": "home",
        b"\x1b[1~": "home",
        b"g": "home",
        b"\x1b[F": "end",
        b"\x1b[4~": "end",
        b"G": "end",
        b"q": "quit",
        b"Q": "quit",
    }.items(),
    key=lambda item: -len(item[0]),
)


def _past_escape(data: bytes, at: int) -> int:
    """The index after an escape sequence at `at` (CSI or SS3), or after a lone ESC."""
    if data[at + 1 : at + 2] not in (b"[", b"O"):
        return at + 1
    end = at + 2
    while end < len(data) and not 0x40 <= data[end] <= 0x7E:
        end += 1
    return end + 1


def move(order: Sequence[int], selected: int | None, key: str, page: int = 10) -> int | None:
    """The PID selected after `key`, among `order` (PIDs as shown)."""
    if not order:
        return None
    index = order.index(selected) if selected in order else 0
    step = {"up": -1, "down": 1, "page-up": -page, "page-down": page}.get(key, 0)
    index = {"home": 0, "end": len(order) - 1}.get(key, index + step)
    return order[max(0, min(len(order) - 1, index))]


def render(view: View, width: int, height: int) -> Text:
    """One frame: a title, the host, the CPU map, the jobs with a bar each, the selected
    job's layers (when `explain` gives them) and members, then the keys (when `live`).
    At most `height` lines of at most `width` cells; live, exactly `height` lines, the
    keys on the last. Everything a job chose passes through `visible`."""
    width, height = max(width, 1), max(height, 1)
    live = view.live
    title = _banner(
        " corecap top"
        + (f"  {visible(str(view.status['host']['policy']))}" if view.status else ""),
        f"{view.clock}  every {view.interval:g}s " if live else f"{view.clock} ",
        width,
    )
    footer = _banner(" up/down j/k: select   q: quit", visible(view.error or "") + " ", width)
    if view.status is None:
        lines = [title, Text(" " + visible(view.error or "no answer yet"), style="bold red")]
        return _frame(lines, [footer] if live else [], width, height, live)

    host = view.status["host"]
    ordered = rows(view.status["jobs"])
    pids = [row.pid for row in ordered]
    selected = view.selected if view.selected in pids else (pids[0] if pids else None)
    head = [title, _host_line(host, ordered), *_cpu_map(host, ordered, width, height)]
    tail = [footer] if live else []

    room = height - len(head) - len(tail)
    detail = [] if selected is None else _detail(ordered[pids.index(selected)], view, width)
    want_jobs = 2 + max(len(ordered), 1)  # a blank line, the header, the rows
    want_detail = 1 + len(detail) if detail else 0
    detail_room = min(want_detail, max(room - want_jobs, min(want_detail, 6)))
    job_room = room - detail_room
    if job_room < 3:  # the jobs come first
        job_room, detail_room = room, 0
    middle = _job_lines(ordered, selected, width, job_room)
    if detail_room > 1:
        middle += [Text(""), *detail[: detail_room - 1]]
    return _frame([*head, *middle], tail, width, height, live)


def _frame(body: list[Text], tail: list[Text], width: int, height: int, live: bool) -> Text:
    """`body` then `tail` at the bottom (padded between when `live`), each line cut to
    `width` cells, `height` lines at most."""
    body = body[: max(0, height - len(tail))]
    if live:
        body += [Text("")] * (height - len(tail) - len(body))
    else:
        while body and not body[-1].plain.strip():
            body.pop()
    lines = [*body, *tail][:height]
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return Text("\n").join(lines)


def _banner(left: str, right: str, width: int) -> Text:
    """A full-width reversed bar: `left` at the left, `right` at the right when it fits."""
    room = width - len(left)
    text = left + (right.rjust(room) if len(right) <= room - 2 else " " * room)
    return Text(text, style="reverse")


def _host_line(host: Document, ordered: Sequence[Row]) -> Text:
    over = sum(1 for row in ordered if row.violating)
    line = Text(f" mode {visible(str(host['mode']))}, backend {visible(str(host['backend']))}; ")
    line.append(f"{len(ordered)} jobs, ")
    line.append(f"{over} in violation", style=VIOLATION_STYLE if over else "")
    return line


def _legend(cells: Sequence[tuple[int, str, str]], ordered: Sequence[Row]) -> Text:
    """What the glyphs of the map mean, with how many CPUs each kind has."""
    glyphs = Counter(glyph for _, glyph, _ in cells)
    held = sum(n for glyph, n in glyphs.items() if glyph not in _NOT_HELD)
    keys = sorted({row.glyph for row in ordered}, key=lambda g: (GLYPHS + MORE).find(g))
    span = "" if not keys else keys[0] if len(keys) == 1 else f"{keys[0]}-{keys[-1]}"
    parts = [f"{span}: held {held}"] if span else []
    parts += [f"{SHARED} shared {glyphs[SHARED]}", f"{FREE} free {glyphs[FREE]}"]
    parts += [f"{RESERVED} reserved {glyphs[RESERVED]}"]
    if glyphs[NOT_FOR_JOBS]:
        parts.append(f"{NOT_FOR_JOBS} not for jobs {glyphs[NOT_FOR_JOBS]}")
    return Text(" " + "  ".join(parts), style="dim")


_NOT_HELD = frozenset({SHARED, FREE, RESERVED, NOT_FOR_JOBS})


def _cpu_cells(host: Document, ordered: Sequence[Row]) -> list[tuple[int, str, str]]:
    """Each CPU with its glyph and style: the job holding it (its glyph; a sub-job's, not
    its parent's, when only one family holds it), shared by jobs of several families,
    free, reserved, or not for jobs (online but outside corecapd's eligible CPUs)."""
    reserved = {int(cpu) for cpu in host.get("reserved_cpus", [])}
    eligible = {int(cpu) for cpu in host.get("eligible_cpus", [])}
    holders: dict[int, list[Row]] = {}
    family: dict[int, int] = {}
    root = 0
    for row in ordered:
        root = row.pid if row.depth == 0 else root
        family[row.pid] = root
        for cpu in row.job.get("cpus", []):
            holders.setdefault(int(cpu), []).append(row)
    online = {int(cpu) for cpu in host.get("online_cpus", [])} or (eligible | reserved)
    cells = []
    for cpu in sorted(online | set(holders)):
        held = holders.get(cpu, [])
        if len({family[row.pid] for row in held}) > 1:
            violating = any(row.violating for row in held)
            cells.append((cpu, SHARED, VIOLATION_STYLE if violating else "bold yellow"))
        elif held:
            row = max(held, key=lambda row: row.depth)
            cells.append((cpu, row.glyph, row.style))
        elif cpu in reserved:
            cells.append((cpu, RESERVED, "dim"))
        elif cpu in eligible:
            cells.append((cpu, FREE, "green"))
        else:
            cells.append((cpu, NOT_FOR_JOBS, "dim"))
    return cells


def _cpu_map(host: Document, ordered: Sequence[Row], width: int, height: int) -> list[Text]:
    """The CPU map, then its legend. Each CPU as "id glyph" when that fits in two lines;
    else one glyph a CPU, in groups of 8, each line led by its first CPU's id, at most a
    quarter of the screen (a last line says how many more)."""
    cells = _cpu_cells(host, ordered)
    label = " CPUs "
    cell = len(str(cells[-1][0])) + 4 if cells else 0  # " 12 A ": the widest id, its glyph
    per_line = max(1, (width - len(label)) // cell) if cells else 0
    lines: list[Text] = []
    if cells and len(cells) <= 2 * per_line:
        for start in range(0, len(cells), per_line):
            line = Text(label if start == 0 else " " * len(label))
            for cpu, glyph, style in cells[start : start + per_line]:
                line.append(f"{cpu} ".rjust(cell - 2))
                line.append(glyph, style=style)
                line.append(" ")
            lines.append(line)
    elif cells:
        digits = len(str(cells[-1][0]))
        groups = max(1, (width - digits - 2) // 9)
        step = 8 * groups
        limit = max(1, height // 4)
        starts = list(range(0, len(cells), step))
        for n, start in enumerate(starts[:limit]):
            if n == limit - 1 and len(starts) > limit:
                lines.append(Text(f" ... and {len(cells) - start} more CPUs", style="dim"))
                break
            line = Text(f" {cells[start][0]:>{digits}} ")
            for i, (_, glyph, style) in enumerate(cells[start : start + step]):
                line.append(" " if i and i % 8 == 0 else "")
                line.append(glyph, style=style)
            lines.append(line)
    else:
        lines.append(Text(label + "none online", style="dim"))
    lines.append(_legend(cells, ordered))
    return lines


def _job_lines(ordered: Sequence[Row], selected: int | None, width: int, room: int) -> list[Text]:
    """A blank line, the header, then as many rows as `room` allows around the selection."""
    if room < 2:
        return []
    if not ordered:
        return [Text(""), Text(" no jobs", style="dim")][:room]
    shown = max(0, room - 2)
    index = next((i for i, row in enumerate(ordered) if row.pid == selected), 0)
    first = max(0, min(index - shown // 2, len(ordered) - shown))
    window = ordered[first : first + shown]
    columns = _columns(ordered, width)
    header = _cells(columns, ["", "PID", "USER", "RULE", "CPUS", "THR/BUD", "", "LOAD", "STATE"])
    header.stylize("bold")
    above = Text("")
    if len(window) < len(ordered):
        above = Text(f" jobs {first + 1}-{first + len(window)} of {len(ordered)}", style="dim")
    lines = [above, header]
    for row in window:
        lines.append(_job_line(row, row.pid == selected, columns))
    return lines


@dataclass(frozen=True)
class _Columns:
    widths: tuple[int, ...]  # key, PID, USER, RULE, CPUS, THR/BUD, bar, LOAD, STATE
    right: frozenset[int] = frozenset({1, 5, 7})


def _columns(ordered: Sequence[Row], width: int) -> _Columns:
    """Column widths for `width` cells: RULE, then USER, then CPUS shrink (to 6 cells)
    before the bar goes."""
    texts = [_row_texts(row) for row in ordered]

    def natural(i: int, header: str, cap: int) -> int:
        return min(cap, max([len(header), *(len(t[i]) for t in texts)]))

    pid, user, rule = natural(0, "PID", 10), natural(1, "USER", 12), natural(2, "RULE", 24)
    cpus, counts = natural(3, "CPUS", 16), natural(4, "THR/BUD", 13)
    load, state = natural(5, "LOAD", 5), natural(6, "STATE", 9)

    def left() -> int:  # cells left for the bar: 2 for the key, 8 separators
        return width - (2 + pid + user + rule + cpus + counts + load + state + 8)

    while left() < BAR_MIN:
        if rule > 6:
            rule -= 1
        elif user > 6:
            user -= 1
        elif cpus > 6:
            cpus -= 1
        else:
            break
    bar = min(BAR_MAX, left()) if left() >= BAR_MIN else 0
    return _Columns((2, pid, user, rule, cpus, counts, bar, load, state))


def _row_texts(row: Row) -> list[str]:
    """PID, USER, RULE (indented for a sub-job), CPUS, THR/BUD, LOAD, STATE."""
    job = row.job
    budget = int(job["budget"])
    load = f"{min(999, round(100 * int(job['threads']) / budget))}%" if budget > 0 else "-"
    indent = "  " * (row.depth - 1) + "\\_ " if row.depth else ""  # as status, as ps f
    return [
        str(row.pid),
        visible(str(job.get("user", "?"))),
        indent + visible(str(job.get("rule", "?"))),
        format_cpulist(int(cpu) for cpu in job.get("cpus", [])) or "-",
        f"{job['threads']}/{budget}",
        load,
        "VIOLATION" if row.violating else ("over" if row.over > 0 else "ok"),
    ]


def _cells(columns: _Columns, values: Sequence[str | Text]) -> Text:
    line = Text("")
    for i, (value, width) in enumerate(zip(values, columns.widths, strict=True)):
        if width == 0:
            continue
        cell = value if isinstance(value, Text) else Text(value)
        if cell.cell_len > width:
            cell.truncate(width, overflow="ellipsis")
        elif i in columns.right:
            cell = Text(" " * (width - cell.cell_len)) + cell
        else:
            cell.truncate(width, pad=True)
        if i:
            line.append(" ")
        line.append_text(cell)
    return line


def _job_line(row: Row, selected: bool, columns: _Columns) -> Text:
    """A job's row: a violation in red (its state reversed), over budget in yellow; the
    selected row marked '>' and reversed (visible without colour too)."""
    texts = _row_texts(row)
    emphasis = "bold red" if row.violating else ("yellow" if row.over > 0 else "")
    pid, user, rule, cpus, counts, load = (Text(t, style=emphasis) for t in texts[:6])
    state = Text(texts[6], style=VIOLATION_STYLE if row.violating else emphasis)
    key = Text(">" if selected else " ")
    key.append(row.glyph, style=row.style)
    bar = _bar(row, columns.widths[6])
    line = _cells(columns, [key, pid, user, rule, cpus, counts, bar, load, state])
    if selected:
        line.stylize("reverse")
    return line


def _bar(row: Row, width: int) -> Text:
    """`[|||||   :  ]`: threads against the budget, the budget at two thirds of the bar
    (a ':' when not reached), within it green, beyond it red."""
    inner = max(0, width - 2)
    mark = round(inner * 2 / 3)
    budget, threads = int(row.job["budget"]), int(row.job["threads"])
    filled = inner if budget <= 0 else min(inner, round(threads / budget * mark))
    bar = Text("[")
    bar.append("|" * min(filled, mark), style="green")
    bar.append("|" * max(0, filled - mark), style="bold red")
    rest = inner - filled
    if filled < mark:
        bar.append(" " * (mark - filled) + ":", style="dim")
        rest -= mark - filled + 1
    bar.append(" " * max(0, rest) + "]")
    return bar


def _detail(row: Row, view: View, width: int) -> list[Text]:
    """The selected job: what it is, its layers (explain's `layers`, when the daemon
    gives them), the diagnosis, its members and its notes."""
    job = row.job
    pid, user, _, cpus, counts, _, state = _row_texts(row)
    first = Text(f" {row.glyph} ", style=row.style)
    rule = visible(str(job.get("rule", "?")))
    first.append(f"PID {pid}, {user}, rule {rule}: {counts} threads on CPUs {cpus}, ")
    first.append(state, style=VIOLATION_STYLE if row.violating else "")
    first.append(f", {float(job.get('cpu_percent', 0.0)):.1f}% CPU")
    lines = [first]
    if job.get("budget_basis"):
        lines.append(Text(f"   budget: {visible(str(job['budget_basis']))}"))
    detail = view.detail if view.detail and view.detail.get("job") == row.pid else None
    layers = layer_counts(detail)
    if layers:
        lines += _packed(
            "layers",
            [
                Text(
                    f"{visible(name)} {threads}" + ("" if expected is None else f"/{expected}"),
                    style="bold red" if oversized else "",
                )
                for name, threads, expected, oversized in layers
            ],
            width,
        )
    over = row.over > 0 or any(oversized for *_, oversized in layers)
    hints = detail.get("hints") if detail and over else None  # why it is over
    if hints:
        lines.append(Text(f"   diagnosis: {visible(str(hints[0]))}", style="yellow"))
    members = job.get("members") or []
    lines += _packed(
        "members",
        [
            Text(
                f"{m['pid']} {visible(str(m['kind']))} {m['threads']}"
                + ("" if m.get("budget") is None else f"/{m['budget']}")
            )
            for m in members
        ],
        width,
    )
    lines += [Text(f"   note: {visible(str(note))}", style="dim") for note in job.get("notes", [])]
    return lines


def layer_counts(detail: Document | None) -> list[tuple[str, int, int | None, bool]]:
    """The selected job's threads by layer from `explain`'s `layers` (a list of {"name",
    "threads", "expected": threads the grant allows the layer or null, "oversized"}; a
    mapping of layer to threads is taken too): (name, threads, expected or None, wider
    than it should be). [] when the reply has none (top then shows the members only)."""
    layers = detail.get("layers") if detail else None
    if isinstance(layers, Mapping):
        layers = [{"name": name, "threads": threads} for name, threads in layers.items()]
    found = []
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, Mapping) or not isinstance(layer.get("threads"), int):
            continue
        name, threads = str(layer.get("name", layer.get("layer", "?"))), int(layer["threads"])
        expected = layer.get("expected")
        expected = expected if isinstance(expected, int) else None
        oversized = layer.get("oversized") is True or (expected is not None and threads > expected)
        found.append((name, threads, expected, oversized))
    return found


def _packed(name: str, items: Sequence[Text], width: int) -> list[Text]:
    """`   name: a, b, c` packed into lines of `width` cells (the rest indented)."""
    if not items:
        return []
    lines = [Text(f"   {name}: ")]
    indent = " " * (len(name) + 5)
    for i, item in enumerate(items):
        piece = item + (Text(", ") if i < len(items) - 1 else Text(""))
        if lines[-1].cell_len + piece.cell_len > width and lines[-1].plain.strip() != f"{name}:":
            lines.append(Text(indent))
        lines[-1].append_text(piece)
    return lines


Status = Callable[[], Any]
Explain = Callable[[int], Any]
_FAILURES = (DaemonUnreachable, RemoteError, ProtocolError)


class Session:
    """What the screen holds between frames: the last replies and the selected job, by
    PID (it stays selected as the order changes; when it ends, the row that takes its
    place is). `status()` and `explain(pid)` ask the daemon."""

    def __init__(self, status: Status, explain: Explain, interval: float, live: bool) -> None:
        self._status, self._explain = status, explain
        self.view = View(None, interval=interval, live=live)
        self.order: list[int] = []

    def refresh(self) -> None:
        """Ask for `status`, then `explain` the selected job. Raises what `status` raises."""
        document = self._status()
        previous, selected = self.order, self.view.selected
        self.order = [row.pid for row in rows(document["jobs"])]
        if selected not in self.order and self.order:  # gone: the row that took its place
            at = previous.index(selected) if selected in previous else 0
            selected = self.order[min(at, len(self.order) - 1)]
        self.view = dataclasses.replace(
            self.view,
            status=document,
            selected=selected,
            detail=self._detail(selected),
            error=None,
            clock=time.strftime("%H:%M:%S"),
        )

    def failed(self, error: str) -> None:
        """The daemon did not answer: the screen says `error` until it does again."""
        self.view = dataclasses.replace(
            self.view, status=None, detail=None, error=error, clock=time.strftime("%H:%M:%S")
        )

    def press(self, key: str, page: int) -> None:
        """Move the selection (`move`) and explain the job it lands on."""
        selected = move(self.order, self.view.selected, key, page)
        if selected != self.view.selected:
            detail = self._detail(selected)
            self.view = dataclasses.replace(self.view, selected=selected, detail=detail)

    def _detail(self, pid: int | None) -> Document | None:
        if pid is None:
            return None
        try:
            reply = self._explain(pid)
        except _FAILURES:  # the job ended meanwhile; or the daemon: status will say
            return None
        return reply if isinstance(reply, Mapping) else None


def run(status: Status, explain: Explain, interval: float, once: bool) -> int:
    """Show the screen until `q` (or ^C), refreshing every `interval` seconds; with
    `once`, print one frame and return. `status()` and `explain(pid)` ask the daemon.

    Raises (with `once` only; live, the screen says it and tries again):
        DaemonUnreachable, RemoteError, ProtocolError: from `status()`.
    """
    console = Console(highlight=False, emoji=False)
    session = Session(status, explain, interval, live=not once)
    if once:
        session.refresh()
        # One line less than the terminal: the prompt after it keeps the title on screen.
        console.print(render(session.view, console.width, console.height - 1), no_wrap=True)
        return 0
    keyboard = sys.stdin.fileno() if sys.stdin.isatty() else None
    try:
        with (
            _cbreak(keyboard),
            _resizes() as resized,
            Live(
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            ) as live,
        ):
            _loop(session, live, console, keyboard, resized)
    except KeyboardInterrupt:
        pass
    return 0


def _loop(
    session: Session, live: Live, console: Console, keyboard: int | None, resized: int
) -> None:
    due = 0.0
    while True:
        if time.monotonic() >= due:
            try:
                session.refresh()
            except _FAILURES as err:
                session.failed(f"{err}; trying again")
            due = time.monotonic() + session.view.interval
        live.update(render(session.view, console.width, console.height), refresh=True)
        waiting = [fd for fd in (keyboard, resized) if fd is not None]
        ready, _, _ = select.select(waiting, [], [], max(0.0, due - time.monotonic()))
        if resized in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(resized, 512)
        if keyboard is not None and keyboard in ready:
            data = os.read(keyboard, 512)
            if not data:  # the terminal hung up
                return
            for key in keys(data):
                if key == "quit":
                    return
                session.press(key, page=max(1, console.height // 2))


@contextlib.contextmanager
def _cbreak(fd: int | None) -> Iterator[None]:
    """The terminal in cbreak mode (keys one by one, no echo, ^C still a signal), and as
    it was afterwards, however the screen ends."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _resizes() -> Iterator[int]:
    """A descriptor that becomes readable when the terminal is resized (SIGWINCH, through
    Python's wakeup fd), so that the screen is redrawn at once, not at the next refresh."""
    readable, writable = os.pipe()
    os.set_blocking(readable, False)
    os.set_blocking(writable, False)
    handler = signal.signal(signal.SIGWINCH, lambda signum, frame: None)
    previous = signal.set_wakeup_fd(writable)
    try:
        yield readable
    finally:
        signal.set_wakeup_fd(previous)
        signal.signal(signal.SIGWINCH, handler)
        os.close(readable)
        os.close(writable)
