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
