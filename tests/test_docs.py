"""The README and EXERCISES.md stay true: every command they show parses (its script's --help lists every flag it
uses), and every repository path and link they name exists."""

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "EXERCISES.md"]
SCRIPTS = ["letstalk", "vae", "world", "data", "sample", "train", "evaluate", "bench"]  # the files with a main()
MODULES = [*SCRIPTS, "common", "diffusion", "audio", "config", "metrics"]


def code_lines(doc):
    """The lines of a document's fenced code blocks, a line ending in a backslash joined with the next, with heredoc
    bodies (inline Python) left out."""
    lines, inside, heredoc = [], False, None
    for line in (ROOT / doc).read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside and heredoc:
            heredoc = None if line.strip() == heredoc else heredoc
        elif inside:
            m = re.search(r"<<'?(\w+)'?", line)
            heredoc = m.group(1) if m else None
            lines.append(line)
    return lines


def commands():
    """(doc, script, argv) for every `python SCRIPT.py ...` or `torchrun ... SCRIPT.py ...` line."""
    found = []
    for doc in DOCS:
        for line in code_lines(doc):
            if not line.startswith(("python ", "torchrun ")):
                continue
            words = shlex.split(line.rstrip("\\"), comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith(".py") and w[:-3] in SCRIPTS]
            if scripts:
                i = scripts[0]
                found.append((doc, words[i][:-3], words[i + 1:]))
    return found


def test_the_docs_show_commands_of_every_kind():
    scripts = {script for _, script, _ in commands()}
    assert set(SCRIPTS) <= scripts


@pytest.mark.parametrize("doc, script, argv", commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_command_parses(doc, script, argv, capsys):
    module = importlib.import_module(script)
    sub = [argv[0]] if argv and not argv[0].startswith("-") and script in ("data", "evaluate") else []
    with pytest.raises(SystemExit) as e:
        module.main([*sub, "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "(default: None)" not in help_text  # an option without a default says what happens instead
    for flag in (w.split("=")[0] for w in argv if w.startswith("--")):
        assert flag in help_text, f"{doc}: `{script}.py {' '.join(argv)}` uses {flag}, which --help does not list"


def repo_paths(text):
    """Names of repository files in a text: top-level scripts and docs, and anything under our own folders."""
    pattern = r"(?<![\w/.-])((?:assets|checkpoints|tests|\.ci)/[\w./*-]+|[\w-]+\.(?:py|md)|requirements\.txt)"
    return {p.rstrip(".") for p in re.findall(pattern, text)}


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_and_link_exists(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    for path in repo_paths(text):
        assert list(ROOT.glob(path)), f"{doc} names {path}, which does not exist"
    anchors = {re.sub(r"[^\w -]", "", h.lower()).strip().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith("#"):
            assert target[1:] in anchors, f"{doc} links to {target}, which is no heading"
        else:
            assert (ROOT / target).exists(), f"{doc} links to {target}, which does not exist"


def test_every_public_function_has_a_docstring():
    """Every public function, method and class of the scripts has a docstring (closures inside functions aside)."""
    import ast

    missing = []

    def visit(node, path, file):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not child.name.startswith("_") and ast.get_docstring(child) is None:
                    missing.append(f"{file}:{child.lineno} {'.'.join([*path, child.name])}")
                if isinstance(child, ast.ClassDef):  # methods; a function's own nested helpers are closures
                    visit(child, [*path, child.name], file)
            else:
                visit(child, path, file)  # e.g. definitions under `if` or `try`

    for module in MODULES:
        visit(ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8")), [], f"{module}.py")
    assert not missing, "public functions without a docstring:\n" + "\n".join(missing)
