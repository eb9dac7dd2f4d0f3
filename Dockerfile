# syntax=docker/dockerfile:1
# tether's image: `docker build -t tether:0.1.0 .`
# Runs as uid/gid 10001 with a read-only root filesystem; the only writable paths are the
# VOLUMEs below (in Kubernetes: emptyDirs, see deploy/k8s/). The default command serves
# /etc/tether/tether.yaml (deploy/k8s/base/config/; mount your own config directory there).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- build: a virtualenv with tether and its pinned dependencies ----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tether
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
# Every dependency is pinned (==) in pyproject.toml. Bytecode is compiled here, at build
# time, because the running container cannot write it (read-only root filesystem).
# The azure and gcp extras are the identity libraries of cloud.lookups.azure and
# cloud.lookups.gcp: a sidecar that judges every cloud ships them (without them those lookups
# deny). Measured: +9.3 MB installed (azure-identity, azure-core, msal, google-auth ...),
# the image 357 -> 365 MB.
RUN /opt/tether/bin/pip install '.[azure,gcp]' \
 && /opt/tether/bin/python -m compileall -q /opt/tether/lib

# ---- runtime ----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/tether/bin:$PATH

# iptables is for the transparent-mode init container (tether-redirect, run as root with
# NET_ADMIN/NET_RAW); tether itself never runs it. Versions are not pinned: the base image
# tag fixes the Debian release, and its security updates must flow into rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 tether \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tether \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/tether /var/lib/tether/ca \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/tether/audit \
 && install -d -m 0755 /app /etc/tether

COPY --from=build /opt/tether /opt/tether
COPY deploy/k8s/base/config/ /etc/tether/
COPY --chmod=0755 deploy/transparent/tether-redirect /usr/local/bin/tether-redirect

WORKDIR /app
USER 10001:10001
# Writable at run time, nothing else: tether's state directory, holding the forward proxy's
# CA (forward.ca_dir) and the audit log (audit.path), and /tmp. One volume for the state, not
# one per subdirectory: an engine mounts an image's VOLUMEs over whatever the user mounted at
# their parent, so a nested one would hide the CA a pod's init container put there.
VOLUME ["/var/lib/tether", "/tmp"]
# proxy, forward proxy (HTTP_PROXY), admin (/metrics /healthz /readyz), transparent listener
EXPOSE 8080 8081 9090 15001
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=3).status == 200 else 1)"]
ENTRYPOINT ["tether"]
CMD ["serve", "--config", "/etc/tether/tether.yaml", "--forward-port", "8081"]
