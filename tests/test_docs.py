"""The documents against the code, so that they cannot drift apart: README.md, docs/*.md and benchmarks/RESULTS.md.

Links and anchors resolve; the configuration reference names exactly the config dataclasses' fields and the transform
ops; JSON examples build; every command shown parses with its script's own parser (build_parser(), the script loaded
as a module: nothing is run).

What the documents must follow:
- README.md: at most 250 lines, with a link to every docs/*.md page. Anchors are GitHub's heading slugs (`#` headings
  only), no HTML anchors.
- docs/config.md: a heading per section: "The train config file ..." (the top-level keys), one containing
  `train_config`, `vit_config`, `dist_config`, `distiller_config` (in backticks), "Data config ...", "Transform ops
  ...". Each has a table (rows starting with `|`) whose first cells name its fields in backticks, every field and
  nothing else; a section may nest headings of its own, but another section nested in it is not part of it.
- docs/distillation.md: finetune_teacher.py's parameters in the table headed | parameter | default | meaning |.
- A ```json block holding a whole data config (transform_ops_train) or train config (train_config) builds as one.
- Commands: in ```bash/sh/console or unlabelled blocks and in `inline code`, starting python, python3,
  .venv/bin/python or torchrun; synopses may use [optional], a|b alternatives, `...`, UPPERCASE placeholders and
  shell variables ($seed).
  `python train.py` alone in prose names the script (it must exist) and is not parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import io
import json
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import unquote

from myrtle_vision import config, transforms
from myrtle_vision.errors import ConfigError
from myrtle_vision.training.finetune import TeacherConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
DOCS = [p for p in [README, *PAGES, REPO / "benchmarks" / "RESULTS.md"] if p.is_file()]
CONFIG_DOC = REPO / "docs" / "config.md"
DISTILLATION_DOC = REPO / "docs" / "distillation.md"


# --- reading Markdown ---------------------------------------------------------------------------------------------


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@functools.cache
def markdown(path: Path) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
    """(the file's lines with fenced code blanked out, [(line of a fenced block's first line, language, its lines)])."""
    prose, fenced, fence = [], [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.match(r"\s*(`{3,}|~{3,})(.*)", line)
        if fence is None and m:
            fence = m[1]
            fenced.append((n + 1, (m[2].split() or [""])[0].lower(), []))
        elif fence is not None:
            if m and m[1][0] == fence[0] and len(m[1]) >= len(fence) and not m[2].strip():
                fence = None
            else:
                fenced[-1][2].append(line)
        prose.append(line if fence is None and not m else "")
    return prose, fenced


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


# a code span: a run of backticks, then anything but a blank line, then a run of the same length
SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)


def code_spans(path: Path) -> list[tuple[int, str]]:
    """(line, content) of each inline code span outside fenced code; a span may run over lines of its paragraph."""
    text = "\n".join(markdown(path)[0])
    return [(line_of(text, m.start()), " ".join(m[2].split())) for m in SPAN.finditer(text)]


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of each link and image, and each reference definition, outside code (fenced or inline)."""
    text = SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), "\n".join(markdown(path)[0]))
    inline = re.finditer(r"\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    defined = re.finditer(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", text, re.M)
    return sorted((line_of(text, m.start()), m[1]) for m in [*inline, *defined])


def headings(path: Path) -> list[tuple[int, int, str]]:
    """(line, level, text) of each ATX heading (`#` to `######`) outside fenced code."""
    found = [
        (n, re.match(r" {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$", line)) for n, line in enumerate(markdown(path)[0], 1)
    ]
    return [(n, len(m[1]), m[2]) for n, m in found if m]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text shown, lower-cased, without anything but letters, digits, spaces, hyphens
    and underscores, each space a hyphen."""
    shown = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading shows its text
    return re.sub(r"[^\w\- ]", "", shown.lower()).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for _, _, text in headings(path):
        s = slug(text)
        out.append(f"{s}-{seen[s]}" if s in seen else s)  # GitHub numbers a repeated one: s, s-1, s-2, ...
        seen[s] = seen.get(s, 0) + 1
    return out


def tables(path: Path) -> list[tuple[int, list[str], list[tuple[int, list[str]]]]]:
    """(line, header cells, [(line, cells) of each body row]) of each table outside fenced code."""
    found, in_table = [], False
    for n, line in enumerate(markdown(path)[0], 1):
        row = line.strip()
        if not row.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip("|"))]
        if not in_table:
            found.append((n, cells, []))
        elif not re.fullmatch(r"[\s|:-]+", row):  # not the |---| row
            found[-1][2].append((n, cells))
        in_table = True
    return found


def named(cell: str) -> list[str]:
    """The backticked identifiers in a table cell: "`decay_epochs`, `decay_rate`" names two."""
    return re.findall(r"`([A-Za-z_]\w*)`", cell)


# --- the configuration reference ----------------------------------------------------------------------------------


def config_section(heading: str):
    """The dataclass that the section under ``heading`` documents ("Transform ops" for the ops table), or None."""
    if heading.startswith("The train config file"):
        return config.Config
    if heading.startswith("Data config"):
        return config.DataConfig
    if heading.startswith("Transform ops"):
        return "Transform ops"
    for name, cls in [
        ("train_config", config.TrainConfig),
        ("vit_config", config.VitConfig),
        ("dist_config", config.DistConfig),
        ("distiller_config", config.DistillerConfig),
    ]:
        if f"`{name}`" in heading:
            return cls
    return None


def sections(path: Path) -> dict:
    """What each section of the configuration reference documents: {dataclass or "Transform ops": (heading line,
    heading, {name: line})}, the names being those in the first cell of its tables' rows. A section runs to the next
    heading of its level or above, or to the next section of its own (one nested in it is not part of it)."""
    found, hs = {}, headings(path)
    for i, (start, level, text) in enumerate(hs):
        what = config_section(text)
        if what is None:
            continue
        end = next((n for n, lv, t in hs[i + 1 :] if lv <= level or config_section(t)), float("inf"))
        names = {
            name: n
            for line, _, rows in tables(path)
            if start < line < end
            for n, cells in rows
            for name in named(cells[0])
        }
        found.setdefault(what, (start, text, {}))[2].update(names)
    return found


def undocumented(cls, documented: dict[str, int], doc: str, line: int, section: str, aliases=()) -> list[str]:
    """Both ways: each field of ``cls`` but ``path`` is documented, and each name documented is a field (or an alias)
    of it; ``documented`` maps each name to its line."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"path"}
    missing = [
        f"{doc}:{line} ({section}): field `{name}` of {cls.__name__} is not documented (no table row names it)"
        for name in sorted(fields - set(documented))
    ]
    return missing + [
        f"{doc}:{n} ({section}): `{name}` is documented but is not a field of {cls.__name__}"
        + (f" nor an alias ({', '.join(sorted(aliases))})" if aliases else "")
        for name, n in documented.items()
        if name not in fields | set(aliases)
    ]


# --- the commands shown --------------------------------------------------------------------------------------------

RUNNERS = {"python", "python3", ".venv/bin/python", "torchrun"}
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.[a-z0-9]+)?|\$\{?\w+\}?")  # or a shell variable: $seed
SHELL_OPERATOR = re.compile(r"&&?|\|\|?|;|\d*[<>].*")  # where the command itself ends


def commands(path: Path) -> list[tuple[int, str, bool]]:
    """(line, text, whether inline) of each line of a shell code block (continuations joined, `$ ` prompts stripped,
    and in a block with prompts, only the prompted lines) and each inline code span, whose first word is a Python or
    torchrun."""
    found = [(n, span, True) for n, span in code_spans(path)]
    for first, language, code in markdown(path)[1]:
        if language not in SHELL_BLOCKS:
            continue
        prompted = any(line.lstrip().startswith("$ ") for line in code)
        joined: list[tuple[int, str]] = []
        for n, line in enumerate(code, first):
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1].rstrip() + " " + line.strip())
            else:
                joined.append((n, line.strip()))
        found += [(n, line.removeprefix("$ "), False) for n, line in joined if line.startswith("$ ") or not prompted]
    return sorted(c for c in found if c[1].split(" ", 1)[0] in RUNNERS)


def invocation(command: str) -> tuple[str, list[str]] | None:
    """(the script, its arguments) of a command that runs a .py file; None for `python -m ...`, `python -c`, `-`."""
    words = shlex.split(command, comments=True)
    words = words[: next((i for i, w in enumerate(words) if SHELL_OPERATOR.fullmatch(w)), len(words))]
    script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    if script is None or {"-m", "--module", "-c", "-"} & set(words[:script]):
        return None
    return words[script], words[script + 1 :]


@functools.cache
def script_module(path: Path):
    """The script loaded as a module (not as __main__, so it runs nothing); a benchmark imports its sibling _common."""
    spec = importlib.util.spec_from_file_location(
        "docs_" + "_".join(path.relative_to(REPO).with_suffix("").parts), path
    )
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def synopsis_variants(parser: argparse.ArgumentParser, words: list[str]) -> list[list[str]]:
    """The argument lists a synopsis stands for: `[` `]` and `...` dropped, each `a|b|c` tried in turn (the i-th list
    takes every such word's i-th alternative), and an uppercase placeholder given to an option with choices or an
    int/float type replaced by its first choice or 1."""
    words = [w.replace("[", "").replace("]", "") for w in words]
    alternatives = [[a for a in w.split("|") if a] or [w] for w in words if w and w != "..."]
    return [
        fill_placeholders(parser, [a[min(i, len(a) - 1)] for a in alternatives])
        for i in range(max(map(len, alternatives), default=1))
    ]


def fill_placeholders(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    def stand_in(action, value: str) -> str:
        if action is None or not PLACEHOLDER.fullmatch(value):
            return value
        if action.choices:
            return str(list(action.choices)[0])
        return "1" if getattr(action.type, "__name__", None) in ("int", "float") else value

    out, action = [], None  # action: the option whose values come next
    for word in words:
        if word.startswith("-"):
            option, eq, value = word.partition("=")
            action = parser._option_string_actions.get(option)
            out.append(f"{option}={stand_in(action, value)}" if eq else word)
            if eq or (action is not None and action.nargs == 0):
                action = None
        else:
            out.append(stand_in(action, word))
            if action is not None and action.nargs in (None, "?"):
                action = None
    return out


class ArgparseError(Exception):
    pass


def parse_error(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """argparse's message when ``args`` does not parse (None when it does, --help included)."""

    def error(message):
        raise ArgparseError(message)

    parser.error = error
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(args)
    except ArgparseError as e:
        return str(e)
    except SystemExit as e:
        return None if e.code in (0, None) else f"exit status {e.code}"
    return None


# --- the tests ----------------------------------------------------------------------------------------------------


def test_readme_is_short_and_links_every_docs_page():
    problems = []
    length = len(README.read_text().splitlines())
    if length > 250:
        problems.append(f"README.md: {length} lines, more than 250 (the rest belongs in docs/)")
    linked = {(README.parent / unquote(t.partition("#")[0])).resolve() for _, t in links(README)}
    problems += [f"{rel(page)}: no link in README.md reaches it" for page in PAGES if page.resolve() not in linked]
    assert not problems, "\n".join(problems)


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in DOCS:
        for line, target in links(doc):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / unquote(path)).resolve() if path else doc
            if not dest.exists():
                why = f"{unquote(path)}: no such file or folder (relative to {rel(doc.parent) or '.'}/)"
            elif anchor and dest.suffix != ".md":
                why = f"an anchor into {dest.name}, which is not Markdown"
            elif anchor and anchor not in anchors(dest):
                known = anchors(dest)
                near = [a for a in known if a.startswith(anchor)] or difflib.get_close_matches(anchor, known)
                why = f"no heading of {rel(dest)} has the anchor #{anchor}"
                why += f" (did you mean #{near[0]}?)" if near else ""
            else:
                continue
            broken.append(f"{rel(doc)}:{line}: ({target}): {why}")
    assert not broken, f"{len(broken)} broken link(s):\n" + "\n".join(broken)


def test_the_configuration_reference_documents_every_config_field_and_no_other():
    problems = []
    if not CONFIG_DOC.is_file():
        problems.append("docs/config.md: missing (the configuration reference: one heading per config section)")
    else:
        found = sections(CONFIG_DOC)
        for cls, section, heading in [
            (config.Config, "", '"The train config file ..."'),
            (config.TrainConfig, "train_config", "with `train_config`"),
            (config.VitConfig, "vit_config", "with `vit_config`"),
            (config.DistConfig, "dist_config", "with `dist_config`"),
            (config.DistillerConfig, "distiller_config", "with `distiller_config`"),
            (config.DataConfig, "data_config", '"Data config ..."'),
        ]:
            if cls not in found:
                problems.append(f"docs/config.md: no section documents {cls.__name__} (a heading {heading})")
                continue
            line, text, names = found[cls]
            aliases = config.ALIASES.get(section, {})
            problems += undocumented(cls, names, "docs/config.md", line, f"section {text!r}", aliases)
    teacher = [
        (line, rows)
        for line, header, rows in (tables(DISTILLATION_DOC) if DISTILLATION_DOC.is_file() else [])
        if [h.lower() for h in header] == ["parameter", "default", "meaning"]
    ]
    if not teacher:
        problems.append(
            "docs/distillation.md: "
            + ("no table | parameter | default | meaning |" if DISTILLATION_DOC.is_file() else "missing")
            + " (finetune_teacher.py's parameters, TeacherConfig)"
        )
    for line, rows in teacher:
        names = {name: n for n, cells in rows for name in named(cells[0])}
        problems += undocumented(TeacherConfig, names, "docs/distillation.md", line, "finetune_teacher.py's table")
    assert not problems, "\n".join(problems)


def test_the_transform_ops_table_names_every_op_and_no_other():
    assert CONFIG_DOC.is_file(), "docs/config.md: missing (its section 'Transform ops ...' tables the ops)"
    found = sections(CONFIG_DOC).get("Transform ops")
    assert found, "docs/config.md: no heading starts 'Transform ops' (the section that tables the ops)"
    line, text, names = found
    ops = set(transforms.OPS)
    problems = [f"docs/config.md:{line} (section {text!r}): op `{op}` has no row" for op in sorted(ops - set(names))]
    problems += [
        f"docs/config.md:{n} (section {text!r}): `{op}` is not an op" for op, n in names.items() if op not in ops
    ]
    assert not problems, "\n".join(problems)


def test_every_json_example_of_a_config_builds():
    failures, checked = [], 0
    for doc in DOCS:
        for line, language, code in markdown(doc)[1]:
            try:
                example = json.loads("\n".join(code)) if language == "json" else None
            except json.JSONDecodeError:
                continue  # a fragment of a file, not a file
            if not isinstance(example, dict):
                continue
            for key, cls in [("transform_ops_train", config.DataConfig), ("train_config", config.Config)]:
                if key in example:
                    checked += 1
                    try:
                        config.build(cls, example, f"{rel(doc)}:{line}")
                    except ConfigError as e:
                        failures.append(f"{e} (as a {cls.__name__})")
    assert not failures, f"{len(failures)} of {checked} config example(s) do not build:\n" + "\n".join(failures)


def test_every_command_shown_parses_with_its_scripts_parser():
    failures, checked = [], 0
    for doc in DOCS:
        for line, command, inline in commands(doc):
            where = f"{rel(doc)}:{line}: `{command}`"
            try:
                run = invocation(command)
            except ValueError as e:
                failures.append(f"{where}: not shell words ({e})")
                continue
            if run is None:
                continue
            script = (REPO / run[0]).resolve()
            if not script.is_file():
                failures.append(f"{where}: {run[0]}: no such script")
                continue
            if script.parent not in (REPO, REPO / "benchmarks") or inline and not run[1]:
                continue  # not one of ours; or prose naming a script (`python train.py` is one process), not a command
            checked += 1
            module = script_module(script)
            if not hasattr(module, "build_parser"):
                failures.append(f"{where}: {run[0]} has no build_parser()")
                continue
            parser = module.build_parser()
            errors = {}  # each of argparse's messages once, with the first arguments it came from
            for args in synopsis_variants(parser, run[1]):
                errors.setdefault(parse_error(parser, args), args)
            failures += [
                f"{where}"
                + (f" (as {shlex.join(args)})" if args != run[1] else "")
                + f": {script.name}: error: {error}"
                for error, args in errors.items()
                if error is not None
            ]
    assert checked >= 20, f"only {checked} commands found in {[rel(d) for d in DOCS]}: is the collector broken?"
    assert not failures, f"{len(failures)} of {checked} command(s) do not parse:\n" + "\n".join(failures)
