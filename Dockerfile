# backupd as a sidecar image; the same image is the default helper image for
# volume copies (it has GNU tar), so nothing else has to be pulled.
#
#   docker build -t backupd .
#   docker build --build-arg BASE_IMAGE=backupd-base:test \
#       --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/wheels -t backupd:test .
#     (offline: put the wheels from `pip wheel . -w wheels` into the build context's wheels/)
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build stage
FROM ${BASE_IMAGE} AS build
# The build stage's image is never tagged, so every rebuild leaves one behind (about 330 MB);
# the label finds them: `docker image prune --filter label=backupd.build-stage`.
ARG BUILD_ID=local
LABEL backupd.build-stage=${BUILD_ID}
# pip settings for the build only (index mirror, offline wheels); never in the final image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY . /src
RUN python3 -m venv /opt/backupd \
 && if ls /src/wheels/backupd-*.whl >/dev/null 2>&1; then \
      /opt/backupd/bin/pip install --find-links /src/wheels backupd; \
    else \
      /opt/backupd/bin/pip install /src; \
    fi \
 && /opt/backupd/bin/pip uninstall -y -q pip setuptools >/dev/null 2>&1 || true \
 && /opt/backupd/bin/backupd --version

# ---------------------------------------------------------------- final stage
FROM ${BASE_IMAGE}
# GNU tar is part of every Debian base (it is Essential); fail the build if not.
# restic (Debian's package) runs repository-mode jobs in helpers of this same image; its sftp
# backend runs OpenSSH's ssh.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends restic openssh-client >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && restic version \
 && ssh -V \
 && tar --version | head -1 | grep -q "GNU tar" \
 && (getent group backupd >/dev/null || groupadd --system --gid 10001 backupd) \
 && (id backupd >/dev/null 2>&1 || useradd --system --uid 10001 --gid backupd --home-dir /var/lib/backupd \
      --no-create-home --shell /usr/sbin/nologin backupd) \
 && mkdir -p /etc/backupd /var/lib/backupd /backups \
 && chown backupd:backupd /var/lib/backupd /backups
COPY --from=build /opt/backupd /opt/backupd
ENV PATH=/opt/backupd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BACKUPD_CONFIG=/etc/backupd/backupd.yml \
    BACKUPD_HTTP=0.0.0.0:8080
# Non-root: reaching /var/run/docker.sock then needs the socket's group id
# (compose: group_add: ["${DOCKER_GID}"]; docker run: --group-add GID).
USER backupd:backupd
VOLUME ["/var/lib/backupd", "/backups"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; port = os.environ.get('BACKUPD_HTTP', '8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=8)"]
ENTRYPOINT ["backupd"]
CMD ["run"]
