"""Sidecar injection as a pure function (tokenslice_operator.inject): no API server needed."""

from __future__ import annotations

from tests.operator.conftest import vllm_pod
from tests.operator.test_children import POOL as LLAMA
from tokenslice.cli import build_parser
from tokenslice.inferencepool import InferencePool
from tokenslice_operator.inject import SidecarSpec, inject, json_patch, skip_reason

POOL = InferencePool.parse({"metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"app": "llm"}},
                                                                "targetPorts": [{"number": 8000}]}})
TWO_PORTS = InferencePool.parse({"metadata": {"name": "p"},
                                 "spec": {"selector": {"matchLabels": {"app": "llm"}},
                                          "targetPorts": [{"number": 8000}, {"number": 8001}]}})
SPEC = SidecarSpec(image="s:1", chunk_url="http://gw", chunk_size=32, native=False)


def test_native_sidecar_on_new_servers_and_idempotence() -> None:
    pod = vllm_pod("x", "ns", {"app": "llm"})
    native = inject(pod, POOL, SidecarSpec(image="s:1", chunk_url="http://gw", chunk_size=32, native=True))
    assert [c["name"] for c in native["spec"]["initContainers"]] == ["tokenslice-sidecar"]
    assert native["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in native["spec"]["containers"]] == ["vllm"]
    assert skip_reason(native, "nvidia.com/gpu") == "already injected"
    plain = inject(pod, POOL, SPEC)
    assert skip_reason(plain, "nvidia.com/gpu") == "already injected"
    assert pod["spec"]["containers"][0]["args"][-1] == "8000", "inject must not mutate its input"


def test_port_rewrites_in_shell_commands_and_equals_form() -> None:
    pod = vllm_pod("x", "ns", {}, args=["--port=8000", "--host", "0.0.0.0"])
    assert inject(pod, POOL, SPEC)["spec"]["containers"][0]["args"] == ["--port=8001", "--host", "0.0.0.0"]
    pod = vllm_pod("x", "ns", {}, args=[])
    pod["spec"]["containers"][0]["command"] = ["sh", "-c", "exec vllm serve m --port 8000 --dtype auto"]
    out = inject(pod, POOL, SPEC)["spec"]["containers"][0]
    assert out["command"][-1] == "exec vllm serve m --port 8001 --dtype auto" and not out.get("args")
    # a port already taken in the pod is skipped
    pod = vllm_pod("x", "ns", {})
    pod["spec"]["containers"][0]["ports"].append({"name": "metrics", "containerPort": 8001})
    args = inject(pod, POOL, SPEC)["spec"]["containers"][1]["args"]
    assert args[args.index("--vllm-url") + 1] == "http://127.0.0.1:8002"


def test_json_patch_only_touches_what_injection_changes() -> None:
    pod = vllm_pod("x", "ns", {})
    ops = json_patch(pod, inject(pod, POOL, SPEC))
    assert sorted(op["path"] for op in ops) == ["/metadata/annotations", "/spec/containers", "/spec/volumes"]
    assert {op["op"] for op in ops if op["path"] == "/spec/volumes"} == {"add"}


def test_sidecar_args_parse_with_the_sidecar_cli() -> None:
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "vllm", "image": "v", "args": ["--port", "8000"],
                                                                "ports": [{"containerPort": 8000}]}]}}
    spec = SidecarSpec(image="s", chunk_url="http://gw:8080", chunk_size=48, native=False)
    sidecar = inject(pod, LLAMA, spec)["spec"]["containers"][1]
    argv = [a.replace("$(POD_IP)", "10.0.0.7") for a in sidecar["args"]]  # what the kubelet expands
    args = build_parser().parse_args(argv)
    assert args.command == "sidecar" and args.port == 8000 and args.vllm_url == "http://127.0.0.1:8001"
    assert args.chunk_url == "http://gw:8080" and args.chunk_size == 48 and args.advertise == "10.0.0.7:8000"
    assert str(args.signing_key_file) == "/var/run/tokenslice/signing/key"


def test_injected_sidecar_passes_pod_security_restricted() -> None:
    """restricted: no privilege escalation, non-root, ALL capabilities dropped, seccomp RuntimeDefault."""
    for native in (False, True):
        spec = SidecarSpec(image="s:1", chunk_url="http://gw", chunk_size=32, native=native)
        pod = inject(vllm_pod("x", "ns", {}), POOL, spec)["spec"]
        sidecar = next(c for c in pod.get("initContainers", []) + pod["containers"]
                       if c["name"] == "tokenslice-sidecar")
        sc = sidecar["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any(v.get("hostPath") for v in pod["volumes"])


def test_every_target_port_of_a_multi_port_pool_gets_a_sidecar() -> None:
    """Two vLLMs in one pod (one per GPU), each its own endpoint: each gets its own sidecar; ports stay apart."""
    pool = TWO_PORTS
    pod = vllm_pod("x", "ns", {})
    second = {**pod["spec"]["containers"][0], "name": "vllm-b", "args": ["--model", "m", "--port", "8001"],
              "ports": [{"name": "http-b", "containerPort": 8001}],
              "readinessProbe": {"httpGet": {"path": "/health", "port": "http-b"}}}
    pod["spec"]["containers"].append(second)
    out = inject(pod, pool, SPEC)["spec"]["containers"]
    assert [c["name"] for c in out] == ["vllm", "vllm-b", "tokenslice-sidecar", "tokenslice-sidecar-8001"]
    a, b, side_a, side_b = out
    moved = {c["name"]: c["args"][c["args"].index("--port") + 1] for c in (a, b)}
    assert moved == {"vllm": "8002", "vllm-b": "8003"}, "each vLLM moves to its own free port"
    assert b["readinessProbe"]["httpGet"]["port"] == 8003
    for sidecar, target, vllm_port in ((side_a, "8000", "8002"), (side_b, "8001", "8003")):
        args = sidecar["args"]
        assert args[args.index("--port") + 1] == target
        assert args[args.index("--vllm-url") + 1] == f"http://127.0.0.1:{vllm_port}"
        assert args[args.index("--advertise") + 1] == f"$(POD_IP):{target}"
    names = [p["name"] for c in out for p in c.get("ports", [])]
    assert len(names) == len(set(names)), names


def test_a_shell_command_serving_two_ports_moves_each_port_alone() -> None:
    pool = TWO_PORTS
    pod = vllm_pod("x", "ns", {}, args=[])
    pod["spec"]["containers"][0]["ports"] = []
    pod["spec"]["containers"][0]["command"] = ["sh", "-c", "vllm serve a --port 8000 & vllm serve b --port=8001"]
    out = inject(pod, pool, SPEC)["spec"]["containers"]
    assert out[0]["command"][-1] == "vllm serve a --port 8002 & vllm serve b --port=8003"
    assert [c["name"] for c in out[1:]] == ["tokenslice-sidecar", "tokenslice-sidecar-8001"]


def test_cpu_offload_is_added_to_vllm_unless_the_pod_configures_its_own() -> None:
    spec = SidecarSpec(image="s:1", chunk_url="http://gw", chunk_size=32, native=False, kv_offload_gib=8)
    vllm = inject(vllm_pod("x", "ns", {"app": "llm"}), POOL, spec)["spec"]["containers"][0]
    args = vllm["args"]
    assert args[args.index("--kv-offloading-size") + 1] == "8" and "native" in args
    assert "--kv-offloading-size" not in inject(vllm_pod("x", "ns", {"app": "llm"}), POOL, SPEC)["spec"][
        "containers"][0]["args"]  # off by default
    own = vllm_pod("x", "ns", {"app": "llm"})
    own["spec"]["containers"][0]["args"] += ["--kv-offloading-size", "2"]
    args = inject(own, POOL, spec)["spec"]["containers"][0]["args"]
    assert args.count("--kv-offloading-size") == 1 and args[args.index("--kv-offloading-size") + 1] == "2"
