"""pytest hooks for running the notebooks under nbval (`make test`).

nbval runs every code cell of a notebook, in order, in one kernel. nbdev marks some
cells as not part of a non-interactive run; this file makes nbval honour the same marks,
so that `pytest` and `nbdev-test` agree on which cells run:

* `#| eval: false` (any spacing: `#|eval:false`, `#| eval:False`, ...) -> never run;
* a flag directive such as `#| slow` or `#| gpu` -> skipped; the flags are read from
  `tst_flags` in `[tool.nbdev]` of pyproject.toml, so a new flag works without editing this
  file. Set `NVILA_RUN_<FLAG>=1` (e.g. `NVILA_RUN_SLOW=1`) to run the cells of one flag;
* `skip_exec: true` in a notebook's front matter -> the whole notebook is skipped;
* cells calling `nbdev_export(` -> skipped (a test run must not rewrite the package).

A skipped cell is not executed at all, so a later cell that needs its variables fails:
flagged cells should be leaves.

nbdev-clean keeps cell outputs but blanks every `execution_count`, and nbval fails any cell
whose reference has outputs but no count ("Unrun reference cell has outputs"). So each such
cell gets a count in memory (the file is untouched): nbval then runs it normally, and compares
its outputs only where the cell asks for it (`# NBVAL_CHECK_OUTPUT`, since we run --nbval-lax).

nbval only sees its markers as plain comments (`# NBVAL_CHECK_OUTPUT`); written the nbdev way,
`#| NBVAL_CHECK_OUTPUT` (or `#| NBVAL_SKIP`, ...) is a directive nbval would silently ignore,
so such directives are applied here too.

It also sets `MPLBACKEND=Agg` (unless already set) before any kernel starts: the kernels
nbval launches inherit this process's environment, so plots render off-screen.
"""
from __future__ import annotations

import os
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

# The kernels are started after collection, from this environment (nbval: --nbval-current-env).
os.environ.setdefault("MPLBACKEND", "Agg")

try:
    from nbval.plugin import IPyNbCell, comment_markers as NBVAL_MARKERS
except ImportError:  # nbval missing: nothing to filter
    IPyNbCell, NBVAL_MARKERS = None, {}

_ROOT = Path(__file__).resolve().parent.parent

# nbdev's directive syntax (fastcore.nbio): a leading comment line `#| name[: value]`.
# Directives only count in the cell's leading block of directives, blank lines and %%magics.
_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*(?P<name>[^\s:]+)\s*:?\s*(?P<value>.*?)\s*$")
_LEADING = re.compile(r"^\s*(#\s*\||%%\w+|$)")
_SKIP_EXEC = re.compile(r"^\s*(-\s*)?skip_exec\s*:\s*(true|True|yes)\s*$", re.M)


def _tst_flags() -> list[str]:
    "The flags in `[tool.nbdev] tst_flags` of pyproject.toml (a space-separated string or a list)."
    try:
        with open(_ROOT / "pyproject.toml", "rb") as f:
            flags = tomllib.load(f).get("tool", {}).get("nbdev", {}).get("tst_flags", "")
    except (OSError, tomllib.TOMLDecodeError):
        return []
    return flags.split() if isinstance(flags, str) else [str(o) for o in flags]


def _forced(flag: str) -> bool:
    "Is the flag switched on by the environment, e.g. NVILA_RUN_SLOW=1?"
    return os.environ.get(f"NVILA_RUN_{flag.upper()}", "").strip().lower() in ("1", "true", "yes", "on")


def cell_directives(source: str) -> dict[str, str]:
    "The nbdev directives of a cell: `{name: value}`, `''` for a bare flag such as `#| slow`."
    out = {}
    for line in source.splitlines():
        if not _LEADING.match(line):
            break
        m = _DIRECTIVE.match(line)
        if m:
            out[m["name"]] = m["value"]
    return out


def skip_reason(cell, skip_flags) -> str | None:
    "Why nbdev would leave this cell out of a test run, or None if it runs."
    if "skip-execution" in cell.get("metadata", {}).get("tags", []):
        return "tagged skip-execution"
    if "nbdev_export(" in cell.source:
        return "calls nbdev_export"
    dirs = cell_directives(cell.source)
    meta = cell.get("metadata", {}).get("nbdev", {})  # nbdev also reads directives from metadata
    dirs = {**{k: str(v) for k, v in meta.items()}, **dirs} if isinstance(meta, dict) else dirs
    if dirs.get("eval", "").lower() == "false":
        return "#| eval: false"
    hit = [f for f in skip_flags if f in dirs]
    if hit:
        return f"#| {hit[0]} (set NVILA_RUN_{hit[0].upper()}=1 to run it)"
    return None


def _notebook_skipped(nb) -> bool:
    "Front matter (raw/markdown cells before the first code cell) says `skip_exec: true`."
    for cell in nb.cells:
        if cell.cell_type == "code":
            return False
        if _SKIP_EXEC.search(cell.source):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if IPyNbCell is None:
        return
    skip_flags = [f for f in _tst_flags() if not _forced(f)]
    for item in items:
        if not isinstance(item, IPyNbCell):
            continue
        nb = getattr(item.parent, "nb", None)
        if nb is not None and _notebook_skipped(nb):
            item.add_marker(pytest.mark.skip(reason="notebook front matter: skip_exec"))
            continue
        for name in cell_directives(item.cell.source).keys() & NBVAL_MARKERS.keys():
            opt, val = NBVAL_MARKERS[name] if isinstance(NBVAL_MARKERS[name], tuple) else (NBVAL_MARKERS[name], True)
            item.options[opt] = val
        reason = skip_reason(item.cell, skip_flags)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif item.cell.get("execution_count") is None and item.cell.get("outputs"):
            item.cell["execution_count"] = item.cell_num + 1  # see the module docstring
