"""Every command in the bash blocks of README.md and docs/**/*.md works as written: the ones that run offline in
seconds run (configure), the rest are checked against what they call (make targets, modules and scripts, their
flags, config keys given to `dvc exp run -S`, deployment names and their parameters). Every relative link in
those files resolves to a file in the repository (and its anchor to a heading there), and no tracked file
points outside the repository."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DOCS = {str(path.relative_to(ROOT)): path.read_text() for path in DOC_FILES}


def readme_commands() -> list[str]:
    """Each command line of the bash blocks (continuations joined, comments dropped)."""
    commands = []
    blocks = [block for text in DOCS.values() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.extend(part.strip() for part in command.split("&&"))
    return commands


COMMANDS = readme_commands()


def words(command: str) -> list[str]:
    return shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", command))  # <your value> placeholders


def flags(command: str) -> list[str]:
    return [w.split("=")[0] for w in words(command) if w.startswith("--")]


def help_text(args: list[str]) -> str:
    done = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_readme_has_commands():
    assert "make demo" in COMMANDS and "make test" in COMMANDS


def test_every_make_target_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    for command in COMMANDS:
        if command.startswith("make "):
            assert words(command)[1] in targets, command


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m pipeline configure")])
def test_configure_commands_run(command, tmp_path):
    done = subprocess.run([sys.executable, *words(command)[1:], "--out", str(tmp_path / "params.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "params.yaml").exists()


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python benchmarks/")])
def test_benchmark_commands_take_their_flags(command):
    script = words(command)[1]
    assert (ROOT / script).exists(), script
    text = help_text([script])
    for flag in flags(command):
        assert flag in text, f"{command}: {flag} is not an option of {script}"


def test_pipeline_flow_commands_take_their_flags():
    text = help_text(["-m", "flows.pipeline"])
    for command in COMMANDS:
        if re.match(r"(\.venv/bin/)?python -m flows\.pipeline", command):
            for flag in flags(command):
                assert flag in text, f"{command}: {flag} is not an option of flows.pipeline"


def test_dvc_exp_run_settings_are_config_keys():
    from pipeline.config import load_profile

    for command in COMMANDS:
        if command.startswith("dvc exp run"):
            parts = words(command)
            settings = [parts[i + 1] for i, w in enumerate(parts) if w == "-S"]
            assert settings, command
            load_profile("demo", dict(s.split("=", 1) for s in settings))  # an unknown key raises


def test_deployment_runs_name_registered_deployments_and_their_parameters():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    flows = {}
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        flows[f"{flow.name}/{deployment['name']}"] = flow
    for command in COMMANDS:
        if " deployment run " in f" {command} ":
            parts = words(command)
            name = parts[parts.index("run") + 1]
            assert name in flows, command
            params = [parts[i + 1].split("=")[0] for i, w in enumerate(parts) if w == "--param"]
            assert set(params) <= set(flows[name].parameters.properties), command


def test_start_worker_commands_take_their_flags():
    script = (ROOT / "scripts/start_worker.sh").read_text()
    for command in COMMANDS:
        if command.startswith("scripts/start_worker.sh"):
            for flag in flags(command):
                assert f"{flag})" in script, f"{command}: {flag} is not an option of the script"


# ---------------------------------------------------------------------------- links

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1", re.S | re.M)
INLINE_CODE = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s<>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code: what a renderer reads as links and headings."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text of its links and code, lower case, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a markdown file offers: its headings' slugs (a repeated one gets -1, -2, ...) and HTML
    anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found | set(HTML_ANCHOR.findall(text))


def relative_links(text: str) -> list[str]:
    """The targets of the markdown links, images and link references in ``text`` that are not URLs."""
    body = prose(text)
    targets = LINK.findall(body) + REFERENCE.findall(body)
    return [t for t in targets if t and not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:|//", t)]


def broken_link(source: Path, target: str, root: Path = ROOT) -> str | None:
    """Why ``target``, a link in ``source``, does not resolve; None when it does."""
    path_part, _, anchor = target.partition("#")
    path = (source.parent / unquote(path_part)).resolve() if path_part else source
    if not path.is_relative_to(root):
        return f"{target}: outside the repository"
    if not path.exists():
        return f"{target}: no such file"
    if anchor:
        if path.is_dir() or path.suffix.lower() != ".md":
            return f"{target}: an anchor into a file that is not markdown"
        if unquote(anchor).lower() not in anchors(path.read_text()):
            return f"{target}: no heading #{anchor} in {path.relative_to(root)}"
    return None


def test_the_link_check_reads_markdown_as_github_does(tmp_path):
    assert slug("The submission's estimate") == "the-submissions-estimate"
    assert slug("The competition: State Farm") == "the-competition-state-farm"
    assert slug("`finetune.freeze_bn_stats` and [TTA](x.md)") == "finetunefreeze_bn_stats-and-tta"
    text = "# A\n## A\n```\n# not a heading [x](gone.md)\n```\nsee `[y](gone.md)` and [z](b.md#a-1)\n"
    assert anchors(text) == {"a", "a-1"}
    assert relative_links(text + "[w](https://example.com) ![i](img.png)\n[r]: ref.md\n") == [
        "b.md#a-1", "img.png", "ref.md"]
    (tmp_path / "b.md").write_text(text)
    source = tmp_path / "a.md"
    assert broken_link(source, "b.md#a-1", tmp_path) is None
    assert "no heading #b" in broken_link(source, "b.md#b", tmp_path)
    assert "no such file" in broken_link(source, "c.md", tmp_path)
    assert "outside the repository" in broken_link(source, "../b.md", tmp_path)


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_relative_link_resolves(name):
    source = ROOT / name
    problems = [why for target in relative_links(DOCS[name]) if (why := broken_link(source, target))]
    assert not problems, f"{name}: " + "; ".join(problems)


# ---------------------------------------------------------------------------- the repository is complete

# Paths outside the repository a tracked file must not name: the sibling `shared` folder, a design document
# there (the repository's own is docs/design.md; outside docs/, the bare file name means the other one), and
# this checkout's parent folder.
BARE_DESIGN = re.compile(r"(?<![\w/.-])design\.md")
OUTSIDE = [re.compile(r"\.\./+shared\b"), re.compile(r"(?<![\w.-])shared/design\.md"), BARE_DESIGN]
if ROOT.parent != Path(ROOT.anchor):
    OUTSIDE.append(re.compile(re.escape(str(ROOT.parent) + os.sep)))


def outside_mentions(name: str, text: str) -> list[str]:
    """``name:line: text`` for each mention of a path outside the repository in the tracked file ``name``."""
    in_docs = name.startswith("docs/") and name.endswith(".md")  # its links next door: checked above
    found = []
    for pattern in OUTSIDE:
        if in_docs and pattern is BARE_DESIGN:
            continue
        for match in pattern.finditer(text):
            found.append(f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group()}")
    return found


def tracked_texts() -> dict[str, str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    texts = {}
    for name in filter(None, listed.stdout.split("\0")):
        path = ROOT / name
        try:
            texts[name] = path.read_text()
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
            continue  # deleted in the working tree, a submodule, or binary
    return texts


def test_no_tracked_file_points_outside_the_repository():
    problems = [line for name, text in tracked_texts().items() for line in outside_mentions(name, text)]
    assert not problems, "paths outside the repository (the design document is docs/design.md):\n" + "\n".join(problems)


def test_the_outside_check_catches_the_old_references():
    design, up = "design" + ".md", ".." + "/shared"  # spelled in pieces so that this file passes its own check
    for text in (f"see {up}/{design}", f"(the {design} section 5)", f"shared/{design}'s recipe"):
        assert outside_mentions("Makefile", text), text
    assert outside_mentions("docs/configuration.md", f"shared/{design}")
    assert not outside_mentions("docs/configuration.md", f"[design]({design}#validation)")
    assert not outside_mentions("pipeline/env.py", f"docs/{design}#offline-hygiene; url = ../.dvc-remote")
