"""The local stack's parts that need no engine: configs, the run directory, the CLI's argument handling."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tokenslice.local import cli
from tokenslice.local.stack import EXAMPLE_POLICY, LocalConfig, RunDir
from tokenslice.policy import load_policy


def test_example_policy_and_overrides() -> None:
    policy = load_policy(EXAMPLE_POLICY)
    assert {c.name for c in policy.priority_classes} >= {"interactive", "standard", "batch"}
    assert policy.tenant("batch-a").weight == 2 * policy.tenant("batch-b").weight  # type: ignore[union-attr]
    assert policy.resolve("batch-a", "interactive")[1].name == "batch"   # never escalates
    cfg = LocalConfig(chunk_size=7)
    assert cfg.resolved_policy().chunk_size == 7


def test_run_dir_is_removed_on_close() -> None:
    rd = RunDir()
    (rd.path / "signing.key").write_text("x")
    rd.close()
    assert not rd.path.exists()
    kept = RunDir(keep=True)
    (kept.path / "signing.key").write_text("x")
    kept.close()  # logs and configs stay for a post-mortem; the key never does
    assert kept.path.exists() and not (kept.path / "signing.key").exists()
    shutil.rmtree(kept.path)


def test_local_up_cli_passes_vllm_args_and_rejects_bad_policy(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["up", "--engines", "2", "--chunk-size", "16", "--", "--max-model-len", "2048"])
    assert args.engines == 2 and args.chunk_size == 16
    assert args.vllm_args[-2:] == ["--max-model-len", "2048"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("priorityClasses: [{name: a, priority: 1}, {name: a, priority: 2}]\n")
    assert cli.run(parser.parse_args(["up", "--policy", str(bad)])) == 2
