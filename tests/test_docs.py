"""The shell blocks of README.md and docs/guide name only commands and flags that exist: every `userllm ...`
line names a real command and only options that command accepts, every `python -m userllm...` module
exists, every `make` target is in the Makefile. Guides that drift from the code fail here."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import typer.main

from userllm.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md", *sorted((ROOT / "docs").glob("[gs]*/*.md"))]
BLOCK = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)


def shell_commands(text: str) -> list[str]:
    """Each command of the document's shell blocks, quoted as the shell reads it: continuation lines and
    quotes that span lines joined, comments dropped, split at `&&`, `;`, `|` and `&`."""
    out = []
    for block in BLOCK.findall(text):
        buffer = ""
        for line in re.sub(r"\\\n", " ", block).splitlines():
            buffer = f"{buffer}\n{line}" if buffer else line
            try:
                words = shlex.split(buffer, comments=True)
            except ValueError:  # an open quote: the command goes on on the next line
                continue
            buffer, command = "", []
            for word in [*words, "&&"]:
                if word in ("&&", ";", "|", "&", "||"):
                    out += [shlex.join(command)] if command else []
                    command = []
                else:
                    command.append(word)
    return out


def options(command) -> set[str]:
    names = {"--help"}
    for p in command.params:
        names |= set(p.opts) | set(getattr(p, "secondary_opts", []))
    return names


def check(command_line: str) -> list[str]:
    """What in one command line does not exist (empty when everything does)."""
    words = shlex.split(command_line)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments
        words = words[1:]
    if not words:
        return []
    head = words[0].rsplit("/", 1)[-1]
    if head == "make":
        targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
        return [f"make {t}: no such target" for t in words[1:] if not t.startswith("-") and t not in targets]
    if head in ("python", "python3") and words[1:2] == ["-m"]:
        module = words[2]
        return [] if importlib.util.find_spec(module) else [f"python -m {module}: no such module"]
    if head == "torchrun" and "-m" in words:
        words = ["userllm", *words[words.index("-m") + 2 :]]
        head = "userllm"
    if head != "userllm":
        return []
    command = typer.main.get_command(app)
    rest = words[1:]
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        if rest[0] not in command.commands:
            return [f"userllm {rest[0]}: no such command"]
        command, rest = command.commands[rest[0]], rest[1:]
    known = options(command)
    flags = [w.split("=", 1)[0] for w in rest if w.startswith("--")]
    flags += [w for w in rest if re.fullmatch(r"-[a-zA-Z]", w)]
    return [f"{command_line!r}: {f} is not an option of `{command.name}`" for f in flags if f not in known]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_shell_blocks_name_only_commands_and_flags_that_exist(doc):
    commands = shell_commands(doc.read_text())
    assert commands, f"{doc}: no shell block"
    problems = [p for c in commands for p in check(c)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_does_not_exist():
    assert check("userllm train outputs/x --no-such-flag 3")
    assert check("userllm trian outputs/x")
    assert check("python -m userllm.bench.nothing_here")
    assert check("make no-such-target")
    assert not check("userllm store import outputs/x --db sqlite:///e.db")
    assert not check("USERLLM_API_KEY=k userllm serve runs/x --bf16")
    block = "```bash\nuserllm a \\\n  --b 1 && make test  # the user's note\n```\n"
    assert shell_commands(block) == ["userllm a --b 1", "make test"]
    block = "```bash\ncurl -d '{\"a\":\n 1}' && userllm x &  # c\n```\n"
    assert shell_commands(block) == ["curl -d '{\"a\":\n 1}'", "userllm x"]
