#!/usr/bin/env bash
# A modern CRD server that enforces CEL (x-kubernetes-validations), cached under $TOKENSLICE_CACHE/kube-modern:
#   bin/apiextensions-apiserver  k8s.io/apiextensions-apiserver built in GOPATH mode from Debian sid's
#                                golang-k8s-* source packages with the Go they bring (~13 min on 2 cores, once)
#   bin/etcd                     Debian's etcd-server from trixie-backports/sid (3.5.x)
# Why: the suite's kube-apiserver is v1.20 (the newest buildable here, scripts/setup-kube.sh) and has no CEL, so
# the InferencePool CRD's CEL rules are only exercised by this server (tests/operator/test_crd_cel.py).
# The Debian packages are read through an isolated apt configuration (own sources, lists, cache, empty dpkg
# status): the system's apt sources and dpkg database are not touched, nothing is installed system-wide.
# Idempotent: skipped when both binaries exist; the 2 GB of sources, the debs, lists and Go cache are removed after.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${TOKENSLICE_CACHE:-$ROOT/.cache}/kube-modern"
BIN="$CACHE/bin"
SUITES="bookworm-backports trixie trixie-backports sid"
mkdir -p "$BIN"

step() { printf '==> [kube-modern] %s\n' "$*"; }

if [ -x "$BIN/apiextensions-apiserver" ] && [ -x "$BIN/etcd" ]; then
    step "ready (cached): $(cat "$BIN/VERSIONS" 2>/dev/null || echo "$BIN")"
    exit 0
fi

APT="$CACHE/apt"
mkdir -p "$APT/parts" "$APT/lists/partial" "$APT/cache/archives/partial"
mirror="$(apt-get indextargets --format '$(REPO_URI)' | grep -v -- -security | sort -u | head -1)"
mirror="${mirror:-http://deb.debian.org/debian/}"
printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" "$SUITES" > "$APT/parts/newer.sources"
: > "$APT/status"   # an empty dpkg status: apt resolves the full closure and downloads it, installs nothing
APTOPT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$APT/parts" -o "Dir::State::Lists=$APT/lists"
        -o "Dir::Cache=$APT/cache" -o "Dir::State::status=$APT/status" -o APT::Get::Download-Only=true
        -o Debug::NoLocking=1)
step "isolated apt lists ($SUITES from $mirror)"
apt-get -q "${APTOPT[@]}" update

SRC="$CACHE/root"
if [ ! -x "$BIN/etcd" ]; then
    step "downloading etcd-server (newest of trixie-backports/sid)"
    rm -rf "$CACHE/etcd-debs" && mkdir -p "$CACHE/etcd-debs"
    (cd "$CACHE/etcd-debs" && apt-get -q "${APTOPT[@]}" download etcd-server)
    rm -rf "$CACHE/etcd-root" && mkdir -p "$CACHE/etcd-root"
    for d in "$CACHE"/etcd-debs/*.deb; do dpkg-deb -x "$d" "$CACHE/etcd-root"; done
    cp "$CACHE/etcd-root/usr/bin/etcd" "$BIN/etcd"
    rm -rf "$CACHE/etcd-debs" "$CACHE/etcd-root"
fi

if [ ! -x "$BIN/apiextensions-apiserver" ]; then
    step "downloading golang-k8s-apiextensions-apiserver-dev and its closure from sid (~350 debs, ~350 MB)"
    apt-get -q "${APTOPT[@]}" install -y --no-install-recommends -t sid golang-k8s-apiextensions-apiserver-dev \
        | tail -3
    step "unpacking the golang-* debs (~2 GB)"
    rm -rf "$SRC" && mkdir -p "$SRC"
    for d in "$APT"/cache/archives/golang-*.deb; do dpkg-deb -x "$d" "$SRC"; done
    goroot="$(ls -d "$SRC"/usr/lib/go-1.* | sort -V | tail -1)"
    apiext_version="$(ls "$APT"/cache/archives/golang-k8s-apiextensions-apiserver-dev_*.deb | sed 's/.*_\(.*\)_all.deb/\1/')"
    log="$CACHE/build.log"
    step "building apiextensions-apiserver $apiext_version with $("$goroot/bin/go" version | cut -d' ' -f3) (~13 min on 2 cores)"
    (cd "$SRC/usr/share/gocode/src/k8s.io/apiextensions-apiserver" \
        && GOROOT="$goroot" PATH="$goroot/bin:$PATH" GOPATH="$SRC/usr/share/gocode" GO111MODULE=off \
           GOCACHE="$CACHE/gocache" CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS= \
           nice -n 19 go build -v -trimpath -ldflags '-s -w' -o "$BIN/apiextensions-apiserver.tmp" \
           k8s.io/apiextensions-apiserver) > "$log" 2>&1 < /dev/null &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 30
        printf '    ... %s packages compiled, last: %s\n' "$(wc -l < "$log")" "$(tail -1 "$log")"
    done
    if ! wait "$pid"; then
        echo "apiextensions-apiserver build failed; last lines of $log:" >&2
        tail -30 "$log" >&2
        exit 1
    fi
    mv "$BIN/apiextensions-apiserver.tmp" "$BIN/apiextensions-apiserver"
    printf 'apiextensions-apiserver %s (%s), etcd %s\n' "$apiext_version" \
        "$("$goroot/bin/go" version | cut -d' ' -f3)" "$("$BIN/etcd" --version | head -1 | awk '{print $3}')" \
        > "$BIN/VERSIONS"
    step "built in ${SECONDS}s; removing the unpacked sources, debs, apt lists and Go cache"
fi
rm -rf "$SRC" "$CACHE/gocache" "$APT"

step "ready after ${SECONDS}s: $(cat "$BIN/VERSIONS")"
