"""Every command the README shows for an entry point (``python X.py ...``, ``python -m utils.X
...``, ``accelerate launch ... X.py ...``) parses with that entry point's own parser, with the
block's variables set as the block sets them (``CAPS=...``, ``source scripts/selected/*.env``,
a loop's first value), so that a renamed or removed flag cannot stay in the README."""
import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = {"qlora.py": "qlora", "spul.py": "spul", "baselines.py": "baselines", "inference_spul.py": "inference_spul",
         "bench.py": "bench"}
COMMAND = re.compile(r"(?:python|accelerate launch)\b.*?(?:\b(\w+\.py)\b|-m (utils\.\w+))")


def blocks(text: str) -> list[str]:
    """The README's shell blocks (``` or ```bash), continuation lines joined."""
    found = re.findall(r"^```(?:bash)?\n(.*?)^```", text, flags=re.S | re.M)
    return [b.replace("\\\n", " ") for b in found]


def commands(block: str) -> list[tuple[str, str]]:
    """(entry point, the line as bash would expand it) for each entry-point command in a block."""
    setup, out = [], []
    for raw in block.splitlines():
        line = raw.split(" # ")[0].strip()
        if re.match(r"^[A-Z_]+=\S", line) and " " not in line.split("=", 1)[0]:
            setup.append(line)
        elif line.startswith("source scripts/selected/"):
            setup.append(line)
        elif m := re.match(r"^for (\w+) in (\S+)", line):
            setup.append(f"{m.group(1)}={m.group(2)}")
        m = COMMAND.search(line)
        if m and "<" not in line and "..." not in line:
            target = m.group(1) or m.group(2)
            if target in ENTRY or target.startswith("utils."):
                rest = line[m.end():]
                script = "; ".join(setup + [f"printf '%s\\n' {rest}"])
                expanded = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, check=True).stdout
                out.append((target, expanded))
    return out


def all_commands():
    return [c for b in blocks((REPO / "README.md").read_text()) for c in commands(b)]


def test_the_readme_shows_the_pipeline():
    targets = [t for t, _ in all_commands()]
    assert {"qlora.py", "spul.py", "inference_spul.py", "baselines.py", "utils.report"} <= set(targets)


@pytest.mark.parametrize("target,args", all_commands(), ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_every_readme_command_parses(target, args):
    module = importlib.import_module(ENTRY.get(target, target))
    argv = [a for a in args.split("\n") if a]
    try:
        module.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"README: {target} does not accept: {shlex.join(argv)}")
