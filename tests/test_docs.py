"""The README and docs/ pages: every relative link leads to a file (and, into a page, to one of
its headings), and every `make` target they name is a target of the Makefile.

Pure text processing, no subprocess: links and anchors follow GitHub's rendering (headings
inside code blocks are not headings; anchors are GitHub's slugs, repeated ones numbered), and
`make` counts only where it is a command, in code, not the English word.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# An inline code span: a run of backticks, the code, the same run again (may span lines).
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
# [text](target) and ![alt](target); the target may be <bracketed> and followed by a "title".
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
SHELL_OPERATORS = {";", "&&", "||", "|", "&", "(", ")", "`"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# make's options that take the next word as their argument.
MAKE_OPTIONS_WITH_ARGUMENT = {"-C", "-f", "-I", "-o", "-W", "--directory", "--file", "--makefile"}


def split_page(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code-block lines), each as (line number, text); fence lines are neither."""
    prose, code = [], []
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] \
                and len(match.group(1)) >= len(fence) and not line.strip(" `~"):
            fence = None
        elif fence is None:
            prose.append((number, line))
        else:
            code.append((number, line))
    return prose, code


def paragraphs(prose: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """Runs of consecutive non-blank prose lines: a code span never crosses their ends."""
    runs: list[list[tuple[int, str]]] = [[]]
    for number, line in prose:
        if line.strip() and runs[-1] and runs[-1][-1][0] == number - 1:
            runs[-1].append((number, line))
        elif line.strip():
            runs.append([(number, line)])
    return [run for run in runs if run]


def code_spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The inline code of the prose, each span with the line it starts on."""
    spans = []
    for run in paragraphs(prose):
        text = "\n".join(line for _, line in run)
        for match in CODE_SPAN.finditer(text):
            spans.append((run[0][0] + text.count("\n", 0, match.start()), match.group(2)))
    return spans


def without_code_spans(line: str) -> str:
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (before numbering repeats): the rendered text in lower
    case, every character that is not a letter, digit, space, hyphen or underscore dropped,
    spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    prose, _ = split_page(text)
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose:
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    found = []
    for number, line in prose:
        line = without_code_spans(line)
        for pattern in (INLINE_LINK, REFERENCE_DEFINITION):
            for match in pattern.finditer(line):
                found.append((number, match.group(1).strip("<>")))
    return found


def broken_link(page: Path, target: str) -> str | None:
    """Why `target`, a link on `page`, leads nowhere; None when it resolves (or is not relative)."""
    if SCHEME.match(target) or target.startswith("//"):
        return None  # http(s), mailto, ...: not a file of this repository
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists():
        return f"no such file {shown(resolved)}"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"no heading in {shown(resolved)} gives the anchor #{anchor}"
    return None


def make_targets(makefile: Path) -> set[str]:
    """The targets of the Makefile's rules and its .PHONY list (not its variable assignments)."""
    targets: set[str] = set()
    text = makefile.read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith(("\t", "#")) or not line.strip():
            continue
        match = re.match(r"^([^:=#]+?)\s*::?(?![=])(.*)$", line)
        if not match or re.search(r"[?+!]$", match.group(1)):
            continue
        names = match.group(1).split()
        if names == [".PHONY"]:
            targets.update(match.group(2).split("#")[0].split())
        else:
            targets.update(name for name in names if not name.startswith("."))
    return targets


def make_commands(code: str) -> list[list[str]]:
    """The target lists of every `make` command in a piece of shell: `make` at a command's start
    (after any VAR=value words), options and variable assignments skipped."""
    lexer = shlex.shlex(code, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:  # an unclosed quote in prose-like code: no command to read
        return []
    commands, at_start, i = [], True, 0
    while i < len(words):
        word = words[i]
        if word in SHELL_OPERATORS or set(word) <= set(";&|()"):
            at_start = True
        elif at_start and ASSIGNMENT.match(word):
            pass  # VAR=value before the command
        elif at_start and word == "make":
            targets, i = [], i + 1
            while i < len(words) and words[i] not in SHELL_OPERATORS \
                    and not set(words[i]) <= set(";&|()"):
                argument = words[i]
                if argument in MAKE_OPTIONS_WITH_ARGUMENT:
                    i += 1
                elif not argument.startswith("-") and not ASSIGNMENT.match(argument):
                    targets.append(argument)
                i += 1
            commands.append(targets)
            continue
        else:
            at_start = False
        i += 1
    return commands


def named_make_targets(page: Path) -> list[tuple[int, str]]:
    """(line, target) for every target a `make` command in the page's code names."""
    prose, code = split_page(page.read_text(encoding="utf-8"))
    pieces = code_spans(prose)
    for number, line in code:
        pieces.append((number, re.sub(r"^\s*\$ ", "", line)))  # a shell prompt in a transcript
    found = []
    for number, piece in pieces:
        for targets in make_commands(piece):
            found.extend((number, target) for target in targets)
    return found


def shown(path: Path) -> str:
    """A path as the repository names it (absolute when it lies outside)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def test_there_are_pages_to_check():
    assert (REPO / "docs").is_dir() and len(PAGES) > 1


@pytest.mark.parametrize("page", PAGES, ids=shown)
def test_every_relative_link_resolves(page: Path):
    problems = [
        f"{shown(page)}:{number}: link '{target}': {why}"
        for number, target in links(page)
        if (why := broken_link(page, target))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=shown)
def test_every_make_target_named_exists(page: Path):
    targets = make_targets(REPO / "Makefile")
    problems = [
        f"{shown(page)}:{number}: `make {target}`: no such target in the Makefile"
        for number, target in named_make_targets(page)
        if target not in targets
    ]
    assert not problems, "\n".join(problems)


def test_the_checks_themselves(tmp_path: Path):
    assert github_slug("What `train` does") == "what-train-does"
    assert github_slug("Try the exact job here first: `train --local`") == \
        "try-the-exact-job-here-first-train---local"
    assert github_slug("One preprocessing, each backbone's statistics") == \
        "one-preprocessing-each-backbones-statistics"
    assert make_commands("make build push TAG=v1") == [["build", "push"]]
    assert make_commands('BENCH_QUALITY_ARGS="--runs sgd" make -n bench-quality  # make a note') \
        == [["bench-quality"]]
    assert make_commands("make -C sub deploy MODEL_DATA=s3://b/m.tar.gz && make logs JOB=x") == \
        [["deploy"], ["logs"]]
    assert make_commands("make") == [[]]
    assert make_commands("to make a file, run it") == []
    assert make_commands("make train-job ARGS='--data ./d --role arn:aws:...'   # the same") == \
        [["train-job"]]
    assert {"demo", "test", "help", "gpu-check"} <= make_targets(REPO / "Makefile")
    assert not {"SHELL", "IMAGE", "comma", ".PHONY"} & make_targets(REPO / "Makefile")

    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Part one\n\n```\n# Not a heading\n```\n")
    page.write_text(
        "# Page\n\n## Part\n\n## Part\n\n[a](other.md#part-one) [b](#part-1) ![c](missing.png)\n"
        "[d](other.md#not-a-heading) `[e](ignored.md)` [f](https://example.com/x.md)\n"
        "```bash\nmake no-such-target\n```\n"
    )
    assert [broken_link(page, target) is None for _, target in links(page)] == \
        [True, True, False, False, True]
    assert named_make_targets(page) == [(10, "no-such-target")]
