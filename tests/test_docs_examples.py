"""Every SchedulingPolicy shown to users (docs, README, shipped example files) is valid.

The docs are the first thing a user copies; an example the gateway or the API server would reject is a bug.
"""

import argparse
import re
from pathlib import Path

import pytest
import yaml

from tokenslice.paths import REPO_ROOT
from tokenslice.policy import KIND, SchedulingPolicySpec, load_policy

DOCS = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")])


def _policies_in(path: Path) -> list[dict]:
    found = []
    for block in re.findall(r"```ya?ml\n(.*?)```", path.read_text(), re.S):
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and doc.get("kind") == KIND:
                found.append(doc["spec"])
    return found


EXAMPLES = [(p.name, i, spec) for p in DOCS for i, spec in enumerate(_policies_in(p))]


def test_the_docs_show_policies():
    assert any(name == "kubernetes.md" for name, _, _ in EXAMPLES)


@pytest.mark.parametrize("name,index,spec", EXAMPLES, ids=[f"{n}#{i}" for n, i, _ in EXAMPLES])
def test_policy_in_docs_is_valid(name, index, spec):
    SchedulingPolicySpec.model_validate(spec)


def test_shipped_local_policy_is_valid():
    policy = load_policy(REPO_ROOT / "tokenslice/local/policy.example.yaml")
    assert policy.klass("interactive") is not None and not policy.klass("interactive").preemptible


def _chart_example() -> dict:
    return yaml.safe_load((REPO_ROOT / "charts/tokenslice/values.yaml").read_text())["example"]["policy"]


_LOCAL_EXAMPLE = yaml.safe_load((REPO_ROOT / "tokenslice/local/policy.example.yaml").read_text())
SHOWN = [*((f"{n}#{i}", spec) for n, i, spec in EXAMPLES), ("chart values example.policy", _chart_example()),
         ("local policy.example.yaml", _LOCAL_EXAMPLE)]


@pytest.mark.parametrize("name,spec", SHOWN, ids=[n for n, _ in SHOWN])
def test_shown_policies_are_safe_for_anonymous_clients(name, spec):
    """A copied example must not let an anonymous client (no key, no tenant) ask for the top class."""
    policy = SchedulingPolicySpec.model_validate(spec)
    top = max(policy.priority_classes, key=lambda c: c.priority)
    for asked in (top.name, *(c.name for c in policy.priority_classes if not c.preemptible)):
        _, got = policy.resolve(None, asked)
        assert got.priority < top.priority and got.preemptible, (name, asked, got.name)


# --- every command, flag and path the docs name exists ------------------------------------------------
TOP_DIRS = ("sidecar/", "gateway_ext/", "operator/", "tokenslice/", "crds/", "charts/", "tests/", "e2e/", "docs/",
            "scripts/", "benchmarks/", "docker/")
_COMMAND = re.compile(r"(?:^|[\s`(;&|])(?:\S*/)?tokenslice((?:[ \t]+(?:\\\n)?[^\s`|;&)#]+)+)")


def _code(path: Path) -> list[str]:
    """Code blocks and inline code spans of a markdown file: where commands and paths are shown."""
    text = path.read_text()
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return blocks + inline


def _commands(path: Path) -> list[list[str]]:
    out = []
    for code in _code(path):
        for match in _COMMAND.finditer(code.replace("\\\n", " ")):
            words = [w.rstrip(":,.") for w in match.group(1).split()]
            if "--" in words:  # the rest goes to another program (vLLM)
                words = words[:words.index("--")]
            if words and re.fullmatch(r"[a-z][a-z-]*", words[0]):
                out.append(words)
    return out


def _subparsers(parser) -> dict:
    for action in parser._actions:  # argparse exposes subcommands only through its actions
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def _check_command(words: list[str]) -> str | None:
    """Why ``tokenslice <words>`` names something that does not exist (None: it all exists)."""
    from tokenslice.cli import build_parser

    parser, i = build_parser(), 0
    while (subs := _subparsers(parser)) and i < len(words) and not words[i].startswith("-"):
        if words[i] not in subs:
            return f"no command {words[i]!r} (have {sorted(subs)})"
        parser, i = subs[words[i]], i + 1
    if any(a.nargs == argparse.REMAINDER for a in parser._actions):
        return None  # the rest is another parser's (e.g. `bench micro <part> ...`), known only at run time
    flags = {s for a in parser._actions for s in a.option_strings}
    for word in words[i:]:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in flags:
            return f"no flag {flag} for `tokenslice {' '.join(words[:i])}`"
    return None


COMMANDS = [(p.name, " ".join(w)) for p in DOCS for w in _commands(p)]


def test_the_docs_show_commands():
    assert len(COMMANDS) > 10


@pytest.mark.parametrize("name,command", COMMANDS, ids=[f"{n}:{c[:40]}" for n, c in COMMANDS])
def test_every_command_and_flag_in_the_docs_exists(name, command):
    problem = _check_command(command.split())
    assert problem is None, f"{name}: `tokenslice {command}`: {problem}"


def _paths(path: Path) -> list[str]:
    found = set()
    for code in _code(path):
        for token in re.findall(r"[\w./*-]+", code):
            if token.startswith(TOP_DIRS) and not token.startswith("docs/_"):
                found.add(token.rstrip(".,:"))
    for link in re.findall(r"\]\(([^)#\s]+)", path.read_text()):
        if not re.match(r"[a-z]+:", link):
            found.add(str((path.parent / link).resolve().relative_to(REPO_ROOT)))
    return sorted(found)


PATHS = [(p.name, ref) for p in DOCS for ref in _paths(p)]


@pytest.mark.parametrize("name,ref", PATHS, ids=[f"{n}:{r}" for n, r in PATHS])
def test_every_repo_path_in_the_docs_exists(name, ref):
    assert any(REPO_ROOT.glob(ref)) if "*" in ref else (REPO_ROOT / ref).exists(), f"{name} names {ref}"


def test_the_checks_catch_a_wrong_command_flag_and_path():
    assert _check_command(["sidecar", "--no-such-flag"]) is not None
    assert _check_command(["no-such-command"]) is not None
    assert _check_command(["sidecar", "--chunk-url", "http://x"]) is None
    assert not (REPO_ROOT / "docs/no-such.md").exists()


def test_every_kubectl_and_helm_command_of_the_kubernetes_docs_is_run_by_a_test():
    """e2e/test_kubernetes.py runs the quick start and the pool-status command; the operator tests' ``crds``
    fixture runs ``kubectl apply -f crds/`` (through ``install_crds``: the files as the v1.20 test server takes
    them; test_crd_cel.py creates them unchanged on a CEL server).  A command added to the docs must be added to
    one of them."""
    from e2e.test_kubernetes import STATUS_COMMAND, doc_commands, quickstart

    run = {" ".join(c) for c in quickstart()} | {" ".join(STATUS_COMMAND), "kubectl apply -f crds/"}
    fixture = (REPO_ROOT / "tests/operator/conftest.py").read_text()
    assert "kube_cluster.install_crds(CRDS)" in fixture
    shown = {" ".join(c) for c in doc_commands() if c[0] in ("kubectl", "helm")}
    assert shown <= run, f"not run by any test: {sorted(shown - run)}"
