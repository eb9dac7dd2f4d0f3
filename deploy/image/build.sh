#!/usr/bin/env bash
# Builds tether's container image from the Dockerfile with buildah (no Docker engine needed):
#   deploy/image/build.sh [IMAGE]          (make image; IMAGE defaults to tether:0.1.0)
#
# The base image: $PYTHON_IMAGE when set (e.g. python:3.12-slim-bookworm from a registry).
# Otherwise the Dockerfile's default is pulled, and where no registry serves it, a base is made
# from Debian packages with mmdebstrap (trixie: Python 3.13, python-is-python3, passwd) and
# kept as localhost/tether-base:trixie for later builds. The host's CA bundle is mounted
# read-only into the build so pip inside it trusts what the host trusts (a registry mirror or
# a TLS-inspecting egress proxy).
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${1:-tether:0.1.0}
BASE_TAG=localhost/tether-base:trixie
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

need() {  # need COMMAND PACKAGE: install the Debian package when the command is missing
  command -v "$1" >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "image: installing $2 (Debian)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"; } >/dev/null
  else
    echo "error: building the image needs $1 (apt-get install $2)" >&2; exit 1
  fi
}

need buildah buildah
default_base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
base=${PYTHON_IMAGE:-}
if [ -z "$base" ]; then
  if timeout 120 buildah pull -q "$default_base" >/dev/null 2>&1; then
    base=$default_base
  elif buildah inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
    base=$BASE_TAG
    echo "image: no registry serves $default_base; using $BASE_TAG (made earlier)" >&2
  else
    echo "image: no registry serves $default_base; making $BASE_TAG with mmdebstrap" >&2
    need mmdebstrap mmdebstrap
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mmdebstrap --quiet --variant=apt \
      --include=python3,python3-venv,python-is-python3,passwd,ca-certificates \
      trixie "$work/rootfs.tar" "$DEBIAN_MIRROR"
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
    buildah commit --quiet "$ctr" "$BASE_TAG" >/dev/null
    buildah rm "$ctr" >/dev/null
    base=$BASE_TAG
  fi
fi

mounts=()
[ -f "$CA_BUNDLE" ] && mounts=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
# --format docker keeps the HEALTHCHECK (OCI has no field for it); chroot isolation and the
# host network are what work in an unprivileged build sandbox.
buildah bud --quiet --format docker --isolation chroot --network host --layers=false \
  "${mounts[@]}" --build-arg "PYTHON_IMAGE=$base" -t "$IMAGE" . >/dev/null
echo "image: built $IMAGE on $base"
