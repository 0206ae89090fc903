"""Every SchedulingPolicy shown to users (docs, README, shipped example files) is valid.

The docs are the first thing a user copies; an example the gateway or the API server would reject is a bug.
"""

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


SHOWN = [*((f"{n}#{i}", spec) for n, i, spec in EXAMPLES), ("chart values example.policy", _chart_example()),
         ("local policy.example.yaml", yaml.safe_load((REPO_ROOT / "tokenslice/local/policy.example.yaml").read_text()))]


@pytest.mark.parametrize("name,spec", SHOWN, ids=[n for n, _ in SHOWN])
def test_shown_policies_are_safe_for_anonymous_clients(name, spec):
    """A copied example must not let an anonymous client (no key, no tenant) ask for the top class."""
    policy = SchedulingPolicySpec.model_validate(spec)
    top = max(policy.priority_classes, key=lambda c: c.priority)
    for asked in (top.name, *(c.name for c in policy.priority_classes if not c.preemptible)):
        _, got = policy.resolve(None, asked)
        assert got.priority < top.priority and got.preemptible, (name, asked, got.name)
