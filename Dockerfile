# syntax=docker/dockerfile:1
# kube-proxy-py: the image the DaemonSet in manifests/ runs.
#
# Two stages on Debian 12 (bookworm) slim:
#   build    Debian's Python 3.11 makes a virtualenv in /opt/kube-proxy-py; every dependency
#            comes from requirements.lock, pinned with hashes (pip --require-hashes), then the
#            project itself is installed from this checkout without touching an index.
#   runtime  Debian's Python, the kernel tools every backend needs (iptables with both its
#            nf_tables and legacy backends, nftables 1.0.6 with libnftables, ipset, ipvsadm,
#            conntrack, kmod) and the virtualenv. No compiler, no pip.
#
# The iptables backend: the proxy picks nft or legacy itself at start (KPY_IPTABLES_MODE
# forces it; else the backend that already holds KUBE-/KPY- chains, else the one with more
# rules), so a node never runs two. The plain `iptables`/`ip6tables` names in the image go
# through scripts/iptables-wrapper.sh, which makes the same choice, for people who exec in.
#
# Build (Docker with BuildKit, or podman): docker build -t kube-proxy-py:0.1.0 .
# Behind a TLS-intercepting proxy, give pip the CA bundle that trusts it as a build secret
# (never stored in the image): --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt
# scripts/image-check.sh builds it offline from a debootstrap-made stand-in for the base.

ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
SHELL ["/bin/sh", "-eux", "-c"]
# Package versions follow the bookworm point release the base was built from; pinning exact
# Debian versions would break the build at every security update (hadolint DL3008).
# hadolint ignore=DL3008
RUN apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/kube-proxy-py
COPY requirements.lock /src/requirements.lock
# Wheels only: nothing is compiled, and every file's hash is checked against the lock.
# `set --` adds `--cert` when the optional pip-ca build secret was given.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then set -- --cert /run/secrets/pip-ca; fi; \
    /opt/kube-proxy-py/bin/pip install "$@" --no-cache-dir --disable-pip-version-check \
        --isolated --only-binary=:all: --require-hashes -r /src/requirements.lock
COPY pyproject.toml LICENSE /src/
COPY proxy /src/proxy
# The project: no index, no build isolation (setuptools comes from the lock), no new deps;
# then pip checks that the locked set satisfies the project's own requirements, and the
# build tools leave the environment. kubernetes/aio, the client's asyncio twin (about 70 MB,
# the largest part of the virtualenv), goes too: the proxy uses the synchronous client only,
# and scripts/image-check.sh imports every proxy module in the built image to prove it.
RUN /opt/kube-proxy-py/bin/pip install --no-cache-dir --disable-pip-version-check \
        --isolated --no-index --no-deps --no-build-isolation /src; \
    /opt/kube-proxy-py/bin/pip check; \
    /opt/kube-proxy-py/bin/pip uninstall --yes --quiet setuptools; \
    /opt/kube-proxy-py/bin/python -m pip uninstall --yes --quiet pip; \
    rm -rf /opt/kube-proxy-py/lib/python3.11/site-packages/kubernetes/aio

FROM ${BASE_IMAGE}
SHELL ["/bin/sh", "-eux", "-c"]
# hadolint ignore=DL3008
RUN apt-get update; \
    apt-get install -y --no-install-recommends \
        python3 iptables nftables ipset ipvsadm conntrack kmod; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
COPY --from=build /opt/kube-proxy-py /opt/kube-proxy-py
COPY --chmod=0755 scripts/iptables-wrapper.sh /usr/sbin/iptables-wrapper
COPY --chmod=0755 scripts/node-init.sh /usr/local/sbin/kpy-node-init
# Priority 100 beats Debian's nft (20) and legacy (10) alternatives.
# The nftables backend runs libnftables in-process (libnftables1, with `nftables`) and was
# measured and tested with bookworm's nft 1.0.6, whose quirks it works around: the build
# stops if the base brings another version, which must be tested before it ships.
RUN for family in iptables ip6tables; do \
        update-alternatives --quiet --install "/usr/sbin/${family}" "${family}" /usr/sbin/iptables-wrapper 100 \
            --slave "/usr/sbin/${family}-restore" "${family}-restore" /usr/sbin/iptables-wrapper \
            --slave "/usr/sbin/${family}-save" "${family}-save" /usr/sbin/iptables-wrapper; \
    done; \
    /opt/kube-proxy-py/bin/python -m proxy --version; \
    nft_version="$(nft --version)"; \
    case "$nft_version" in *" v1.0.6 "*) ;; *) echo "nft 1.0.6 expected: $nft_version" >&2; exit 1 ;; esac; \
    /opt/kube-proxy-py/bin/python -c 'import ctypes; ctypes.CDLL("libnftables.so.1")'
ENV PATH=/opt/kube-proxy-py/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="kube-proxy-py" \
      org.opencontainers.image.description="A kube-proxy replacement in Python" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
WORKDIR /
ENTRYPOINT ["python", "-m", "proxy"]
