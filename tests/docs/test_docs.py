"""The documentation is checked like code: the site builds with `mkdocs build --strict`, the configuration page
is what the typed config generates now, every `make` command the docs show exists, and the commands of
"Getting started" run as written against a real TorchServe."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import docs_site
from kit import REPO

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
MAKE = re.compile(r"(?<![\w/.-])make ((?:[a-z][\w./-]*(?:=\S+)?\s*)+)")
TESTED = re.compile(r"<!-- run by tests/docs/test_docs.py -->\s*```bash\n(.*?)```", re.S)


def targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))


def test_the_configuration_page_is_generated_from_the_typed_config() -> None:
    page = DOCS / "reference" / "configuration.md"
    assert page.read_text(encoding="utf-8") == docs_site.reference(), "run `make docs` and commit the page"
    assert "| `explain` |" in page.read_text() and "|  |" not in page.read_text(), "every key has its comment"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    (DOCS / "index.md").write_text(docs_site.index_page((REPO / "README.md").read_text(encoding="utf-8")))
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def code_of(text: str) -> str:
    """The fenced blocks and inline code spans of a page: where commands are shown."""
    fenced = re.findall(r"```.*?```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join([*fenced, *inline])


def test_every_make_command_shown_exists() -> None:
    """Targets by name; archive paths (``make model_store/<name>_int8.mar``) are file targets of the store."""
    known = targets()
    shown: dict[str, str] = {}
    for page in PAGES:
        for words in MAKE.findall(code_of(page.read_text(encoding="utf-8"))):
            word = words.split()[0]
            if "=" not in word and not word.startswith("model_store/"):
                shown.setdefault(word, page.name)
    missing = {word: page for word, page in shown.items() if word not in known}
    assert not missing, missing
    assert len(shown) >= 15


def tracked_text_files() -> list[Path]:
    """The repository's own text: pages, code, comments, configs (not stored data, images or build contexts)."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    skipped = (".png", ".jpg", ".jpeg", ".mar", ".pt", ".Dockerfile")  # a Dockerfile names its staged context
    return [
        REPO / name
        for name in listed
        if not name.startswith("tests/data/") and not name.endswith(skipped) and (REPO / name).is_file()
    ]


def test_every_repository_file_named_exists() -> None:
    """A file of the repository named anywhere in it (a page, a docstring, a comment, `.ci/run`) is there."""
    named = re.compile(r"(?<![\w/.-])((?:scripts|handlers|tests|deploy|triton)/[\w/.-]+\.(?:py|sh|json|yaml|md))\b")
    test_file = re.compile(r"(?<![\w/.-])(test_\w+\.py)\b")
    tests = {path.name for path in (REPO / "tests").rglob("test_*.py")}
    missing: dict[str, str] = {}
    unknown: dict[str, str] = {}
    for source in tracked_text_files():  # each file read once for both checks
        text, where = source.read_text(encoding="utf-8", errors="replace"), str(source.relative_to(REPO))
        missing.update({p: where for p in named.findall(text) if not (REPO / p).exists() and "ts_grpc" not in p})
        unknown.update({name: where for name in test_file.findall(text) if name not in tests})
    assert not missing, missing
    assert not unknown, f"test files named that are not under tests/: {unknown}"


@pytest.mark.e2e
def test_getting_started_runs_as_written() -> None:
    """The marked block of docs/getting-started.md, line by line in one shell, from the repository root."""
    (block,) = TESTED.findall((DOCS / "getting-started.md").read_text(encoding="utf-8"))
    script = "set -euo pipefail\ntrap 'make stop >/dev/null 2>&1 || true' EXIT\n" + block
    run = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '"label"' in run.stdout and '"explanation"' in run.stdout, run.stdout[-2000:]
    assert shlex.split(block)  # the block is plain shell
