"""The Makefile from a fresh clone: every target that runs the project's environment depends on
`install` (read from make's own database), and `make gpu-wheels` in a fresh clone of the
committed HEAD works for real, against a package index this test serves on 127.0.0.1."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# make's own variables from an outer make (`make test`) would change what these runs do.
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
SCRIPT_CALL = re.compile(r"\bbash\s+(scripts/[\w.-]+\.sh)")
UV_CALL = re.compile(r"(?:\$\(UV\)|\buv)\s+(?:run|sync)\b([^;&|\n]*)")
QUOTED = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")
TARGET_LINE = re.compile(r"^([A-Za-z][\w-]*):(?!=)\s*(.*)$")
VARIABLE_LINE = re.compile(r"^([A-Za-z_]\w*) :?= (.*)$")
LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", re.MULTILINE)
SUMMARY = re.compile(r"^gpu-wheels: (\d+) wheels, \d+\.\d MiB in \.whl$", re.MULTILINE)


def database(*assignments: str) -> tuple[dict[str, tuple[set[str], str]], dict[str, str]]:
    """The Makefile's targets (prerequisites, recipe) and variables, as `make -qp` prints them:
    prerequisites expanded as make reads them, recipes and variables as written."""
    out = subprocess.run(["make", "-qp", *assignments], cwd=REPO, env=MAKE_ENV, capture_output=True,
                         text=True, timeout=60)
    assert "# Files" in out.stdout, out.stderr  # -q exits 1: `help` is never up to date
    variables_part, files_part = out.stdout.split("\n# Files\n", 1)
    variables = {m.group(1): m.group(2)
                 for m in map(VARIABLE_LINE.match, variables_part.splitlines()) if m}
    targets = {}
    for block in files_part.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines or lines[0] == "# Not a target:":
            continue
        if "recipe to execute (from 'Makefile'" not in block:
            continue
        found = TARGET_LINE.match(lines[0])
        if found:
            recipe = "\n".join(line[1:] for line in lines if line.startswith("\t"))
            targets[found.group(1)] = (set(found.group(2).split()), recipe)
    return targets, variables


def needs(text: str) -> set[str]:
    """What shell text needs: "env" (.venv, or `uv run`/`uv sync` of the whole project), "uv"
    (uv alone, as `uv run --only-group launch`). Quoted text is a message, not a command."""
    text = QUOTED.sub('""', text)
    found = {"uv" if "--only-group" in args else "env" for args in UV_CALL.findall(text)}
    if ".venv/" in text:
        found.add("env")
    if "$(UV)" in text:
        found.add("uv")
    return found


def recipe_needs(recipe: str, variables: dict[str, str]) -> set[str]:
    for _ in range(3):  # $(SM_EFFDET) holds $(UV) run ...; UV itself stays a word
        recipe = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0))
                        if m.group(1) != "UV" else m.group(0), recipe)
    found = needs(recipe)
    for script in SCRIPT_CALL.findall(recipe):
        lines = (REPO / script).read_text().splitlines()
        found |= needs("\n".join(re.sub(r"(^|\s)#.*", "", line) for line in lines))
    return found


def closure(targets: dict, name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for prerequisite in targets.get(todo.pop(), (set(), ""))[0] - seen:
            seen.add(prerequisite)
            todo.append(prerequisite)
    return seen


def test_every_target_that_runs_the_environment_depends_on_install():
    # --cpu: gpu-check runs .venv's python here (the GPU run's exception is the next test).
    targets, variables = database("GPU_CHECK_ARGS=--cpu")
    wrong, uses = [], {}
    for name, (_, recipe) in targets.items():
        if name in ("install", "uv"):
            continue
        uses[name] = recipe_needs(recipe, variables)
        before = closure(targets, name)
        if "env" in uses[name] and "install" not in before:
            wrong.append(f"{name} runs the environment but does not depend on install")
        elif "uv" in uses[name] and not before & {"uv", "install"}:
            wrong.append(f"{name} runs uv but depends on neither uv nor install")
    assert not wrong, wrong
    # The reading above finds what it must, so that its silence means something.
    env_targets = {name for name, found in uses.items() if "env" in found}
    assert {"demo", "test", "bench", "bench-quality", "gpu-wheels", "gpu-check",
            "image-test"} <= env_targets
    uv_only = {name for name, found in uses.items() if found == {"uv"}}
    assert uv_only == {"deploy", "train-job", "logs"}
    assert not uses["local-train"] and not uses["build"] and not uses["push"]


def test_gpu_check_on_the_device_installs_nothing():
    """The device machine has no network: its `make gpu-check` runs its own python3 with the
    carried wheels, and must not start `uv sync`."""
    targets, _ = database()
    assert not closure(targets, "gpu-check") & {"install", "uv"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal valid wheel: dist-info with METADATA, WHEEL and RECORD (pip checks that the
    metadata's name and version match the file name)."""
    dist = canonical(name).replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests/test_makefile.py\n"
                         "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        digest = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def simple_index(root: Path, locked: dict[str, set[str]]) -> None:
    """A PEP 503 index under root/simple: one page per project, its wheels under root/files."""
    (root / "files").mkdir(parents=True)
    for name, versions in locked.items():
        page = root / "simple" / name
        page.mkdir(parents=True)
        links = []
        for version in sorted(versions):
            wheel = write_wheel(root / "files", name, version)
            links.append(f'<a href="/files/{wheel.name}">{wheel.name}</a><br>')
        (page / "index.html").write_text(
            "<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    requested: list[str]

    def log_message(self, format, *args) -> None:  # noqa: A002  (the base class's name)
        self.requested.append(self.path)


@pytest.mark.timeout(900)
def test_make_gpu_wheels_in_a_fresh_clone(tmp_path):
    """A newcomer's `git clone` then `make gpu-wheels`: install runs first (uv sync into the
    clone's own .venv, offline from uv's cache), then pip downloads the pinned wheels from the
    index named by PIP_INDEX_URL, here one on 127.0.0.1 holding a stand-in for every locked
    version. Only committed files take part: commit before running it."""
    for tool in ("git", "make", "uv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    for command in (["git", "clone", "--quiet", "--no-checkout", str(REPO), str(clone)],
                    ["git", "-C", str(clone), "checkout", "--quiet", head.stdout.strip()]):
        subprocess.run(command, check=True, timeout=120)

    env = {k: v for k, v in MAKE_ENV.items()
           if not k.startswith("PIP_") and k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    env["UV_OFFLINE"] = "1"  # tests talk only to 127.0.0.1; uv is no Python process the guard sees
    export = subprocess.run(
        ["uv", "export", "--frozen", "--no-hashes", "--no-emit-project", "--no-dev"],
        cwd=clone, env=env, capture_output=True, text=True, check=True, timeout=120)
    locked: dict[str, set[str]] = {}
    for name, version in LOCK_LINE.findall(export.stdout):
        locked.setdefault(canonical(name), set()).add(version)
    simple_index(tmp_path / "index", locked)
    script = (clone / "scripts" / "gpu_wheels.sh").read_text()
    listed = re.search(r"^PACKAGES=\((.*?)^\)", script, re.DOTALL | re.MULTILINE).group(1)
    packages = {canonical(word)
                for line in listed.splitlines() for word in line.split("#")[0].split()}

    QuietHandler.requested = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path / "index")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env.update({
            "PIP_INDEX_URL": f"http://127.0.0.1:{server.server_address[1]}/simple/",
            "PIP_CONFIG_FILE": os.devnull,  # no extra index or find-links of this machine's pip
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_CACHE_DIR": "1",  # the stand-ins stay out of the user's pip cache
        })
        run = subprocess.run(["make", "gpu-wheels"], cwd=clone, env=env, capture_output=True,
                             text=True, timeout=840)
    finally:
        server.shutdown()
        server.server_close()
    output = run.stdout + run.stderr
    if run.returncode and "network connectivity is disabled" in output.lower():
        pytest.skip("uv's cache lacks a locked package, and tests do not download: "
                    + output[-500:])
    assert run.returncode == 0, output[-4000:]
    assert (clone / ".venv" / "bin" / "python").exists()  # install ran, into the clone's own .venv

    summary = SUMMARY.search(run.stdout)
    assert summary, run.stdout[-2000:]
    wheels = sorted((clone / ".whl").glob("*.whl"))
    assert int(summary.group(1)) == len(wheels) == len(packages)
    downloaded = {}
    for wheel in wheels:
        dist, version = wheel.name.split("-")[:2]
        downloaded[canonical(dist)] = version
    assert set(downloaded) == packages
    for name, version in downloaded.items():
        assert version in locked[name], (name, version, locked[name])
    assert not (clone / ".whl.partial").exists()
    assert {f"/simple/{name}/" for name in packages} <= set(QuietHandler.requested)
