"""The policy file source: polling hot reload that follows a ConfigMap's symlink swap."""

from __future__ import annotations


def test_policy_file_follows_a_configmap_symlink_swap(tmp_path):
    """Kubelet updates a mounted ConfigMap by swapping the ``..data`` symlink to a new directory."""
    import os

    from tokenslice_picker.policy_source import PolicyFile

    def version(name: str, chunk: int) -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "policy.yaml").write_text(f"chunkSize: {chunk}\n")
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(name)
        os.replace(tmp_link, tmp_path / "..data")  # atomic, like the kubelet

    version("..v1", 16)
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    applied: list[int] = []
    results: list[str] = []
    pf = PolicyFile(tmp_path / "policy.yaml", lambda p: applied.append(p.chunk_size), results.append)
    assert pf.load().chunk_size == 16
    assert not pf.check()  # unchanged
    version("..v2", 64)
    assert pf.check() and applied == [64] and results == ["applied"]
    version("..v3", 0)  # invalid: kept the previous policy
    assert not pf.check() and applied == [64] and results == ["applied", "invalid"]
