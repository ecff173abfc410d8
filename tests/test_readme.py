"""Every command the README shows for an entry point (``python X.py ...``, ``python -m utils.X
...``, ``accelerate launch ... X.py ...``) parses with that entry point's own parser, with the
block's variables set as the block sets them (``CAPS=...``, ``source scripts/selected/*.env``,
a loop's first value), so that a renamed or removed flag cannot stay in the README. Nothing
is run: the variables are expanded here, in Python.

The README and every page of docs/ are also checked as documents: every relative link reaches
an existing file and heading, and every table has the separator row it needs to render."""
import importlib
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = {"qlora.py": "qlora", "spul.py": "spul", "baselines.py": "baselines", "inference_spul.py": "inference_spul",
         "bench.py": "bench"}
COMMAND = re.compile(r"(?:python|accelerate launch)\b.*?(?:\b(\w+\.py)\b|-m (utils\.\w+))")
VAR = re.compile(r"\$\{?(\w+)\}?")
CONTROL = {";", "&&", "||", "|", "&"}


def blocks(text: str) -> list[str]:
    """The README's shell blocks (``` or ```bash), continuation lines joined."""
    found = re.findall(r"^```(?:bash)?\n(.*?)^```", text, flags=re.S | re.M)
    return [b.replace("\\\n", " ") for b in found]


def assignments(line: str) -> dict[str, str]:
    """``NAME=VALUE`` alone on a line (never a command with an environment prefix)."""
    words = shlex.split(line, comments=True) if line.strip() else []
    if len(words) == 1 and (m := re.match(r"^([A-Z_]+)=(.*)$", words[0], flags=re.S)):
        return {m.group(1): m.group(2)}
    return {}


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    """Substitute $VAR / ${VAR}; a word that is one variable alone splits on whitespace, as an
    unquoted expansion does in bash."""
    out = []
    for w in words:
        if w in CONTROL:
            break
        if (m := VAR.fullmatch(w)) and m.group(1) in env:
            out += env[m.group(1)].split()
        else:
            out.append(VAR.sub(lambda m: env.get(m.group(1), m.group(0)), w))
    return out


def commands(block: str) -> list[tuple[str, list[str]]]:
    """(entry point, its arguments with the block's variables expanded) per entry-point command."""
    env, out = {}, []
    for line in block.splitlines():
        line = line.strip()
        env.update(assignments(line))
        if m := re.match(r"^source (scripts/selected/\S+\.env)", line):
            for entry in (REPO / m.group(1)).read_text().splitlines():
                env.update(assignments(entry))
        if m := re.match(r"^for (\w+) in (\S+)", line):
            env[m.group(1)] = m.group(2).rstrip(";")
        m = COMMAND.search(line)
        if m and "<" not in line and "..." not in line:
            target = m.group(1) or m.group(2)
            if target in ENTRY or target.startswith("utils."):
                out.append((target, expand(shlex.split(line[m.end():], comments=True), env)))
    return out


def all_commands():
    return [c for b in blocks((REPO / "README.md").read_text()) for c in commands(b)]


def test_the_readme_shows_the_pipeline():
    targets = [t for t, _ in all_commands()]
    assert {"qlora.py", "spul.py", "inference_spul.py", "baselines.py", "utils.report"} <= set(targets)


def test_expansion_by_hand():
    block = "CAPS=\"--a 1 --b 2\"\nDATASET=x bash scripts/select.sh\nfor s in 3 4; do\n  python spul.py $CAPS --seed $s --out r-s$s && rm -rf r # c\n"
    assert commands(block) == [("spul.py", ["--a", "1", "--b", "2", "--seed", "3", "--out", "r-s3"])]


@pytest.mark.parametrize("target,args", all_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_readme_command_parses(target, args):
    module = importlib.import_module(ENTRY.get(target, target))
    try:
        module.build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"README: {target} does not accept: {shlex.join(args)}")


# --- the README and docs/ as documents: links that resolve, tables that render ----------------

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (blank strings in their place, so numbering holds)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> Iterator[str]:
    seen: dict[str, int] = {}
    for line in prose_lines(text):
        if m := re.match(r"^#{1,6} (.*)", line):
            s = slug(m.group(1))
            seen[s] = seen.get(s, 0) + 1
            yield s if seen[s] == 1 else f"{s}-{seen[s] - 1}"


def dead_links(path: Path) -> list[str]:
    dead = []
    for target in LINK.findall("\n".join(prose_lines(path.read_text()))):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            dead.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in set(anchors(dest.read_text())):
            dead.append(f"{target} (no such heading)")
    return dead


def headerless_tables(text: str) -> list[int]:
    """Line numbers (1-based) of table headers not followed by a separator row."""
    lines = prose_lines(text)
    return [i + 1 for i, line in enumerate(lines)
            if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
            and not (i + 1 < len(lines) and SEPARATOR.match(lines[i + 1].strip()))]


def test_slug_and_checks_by_hand():
    assert slug("Performance (`bench.py`)") == "performance-benchpy"
    assert slug("SPUL's flags of ours: what each did") == "spuls-flags-of-ours-what-each-did"
    assert list(anchors("# A\n```\n# not a heading\n```\n## A\n")) == ["a", "a-1"]
    assert headerless_tables("text\n| a | b |\n| 1 | 2 |\n\n| a |\n|---|\n| 1 |\n") == [2]


def test_dead_links_are_found(tmp_path):
    (tmp_path / "x.md").write_text("# Top\n[ok](#top) [bad](#nowhere) [gone](y.md) [web](https://e.org/z)\n")
    assert dead_links(tmp_path / "x.md") == ["#nowhere (no such heading)", "y.md (no such file)"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(path):
    assert dead_links(path) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_table_has_its_separator_row(path):
    assert headerless_tables(path.read_text()) == []


def test_the_code_map_names_every_module():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Code map"):]
    section = section[:section.index("\n## ", 1)]
    named = set(re.findall(r"`([\w/]+\.py)`", section))
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "utils").glob("*.py") if p.name != "__init__.py"}
    entry = {f"{name}.py" for name in ENTRY.values()}
    assert modules | entry <= named, sorted((modules | entry) - named)
    assert named <= modules | entry, sorted(named - modules - entry)
