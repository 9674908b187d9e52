#!/usr/bin/env bash
# Install and start what backupd's tests need on Debian 12, idempotently:
#   install       Debian packages (Docker engine, busybox, debootstrap, OpenSSH, age, peers)
#   dockerd       start the Docker engine if it is not answering (no systemd here)
#   helper-image  backupd-helper:test: busybox + GNU tar (no registry: built from host files)
#   db-image      dbbase:test: Debian with PostgreSQL 15 and MariaDB (debootstrap, cached)
#   base-image    backupd-base:test: Debian with python3 + venv, the Dockerfile's base in tests
#   all           all of the above, in order
set -euo pipefail

CACHE=/var/cache/backupd-test
HELPER_IMAGE=backupd-helper:test
DB_IMAGE=dbbase:test
BASE_IMAGE=backupd-base:test
APT_PACKAGES=(docker.io busybox-static debootstrap openssh-server openssh-client zstd age pigz restic borgbackup python3-venv)

log() { printf '[testenv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

install() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "packages present"; return; fi
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

dockerd_up() {
  if docker info >/dev/null 2>&1; then log "docker engine answering"; return; fi
  log "starting dockerd"
  (dockerd >/tmp/dockerd.log 2>&1 &)
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && { log "docker engine ready"; return; }
    sleep 1
  done
  log "dockerd did not answer within 60 s; see /tmp/dockerd.log:"; tail -20 /tmp/dockerd.log >&2
  exit 1
}

helper_image() {
  if docker image inspect "$HELPER_IMAGE" >/dev/null 2>&1; then log "$HELPER_IMAGE present"; return; fi
  log "building $HELPER_IMAGE"
  local root; root=$(mktemp -d)
  mkdir -p "$root/bin" "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in sh find ls cat rm mkdir sleep head tail echo true false env stat chmod chown wc sync \
                sha256sum gzip gunzip kill ps id mv cp ln touch dd grep sed tr sort uniq xargs test; do
    ln -sf busybox "$root/bin/$applet"
  done
  # GNU tar (sparse files, --numeric-owner, POSIX format) with the libraries it links.
  local tar_bin; tar_bin=$(readlink -f "$(command -v tar)")
  for f in "$tar_bin" $(ldd "$tar_bin" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
  done
  [ "$tar_bin" = /bin/tar ] || ln -sf "$tar_bin" "$root/bin/tar"
  chmod 1777 "$root/tmp"
  tar -C "$root" -c . | docker import -c 'ENV PATH=/usr/local/bin:/usr/bin:/bin' - "$HELPER_IMAGE" >/dev/null
  rm -rf "$root"
  docker run --rm "$HELPER_IMAGE" tar --version | head -1 >&2
}

db_image() {
  if docker image inspect "$DB_IMAGE" >/dev/null 2>&1; then log "$DB_IMAGE present"; return; fi
  mkdir -p "$CACHE"
  if [ ! -s "$CACHE/dbbase.tar" ]; then
    log "debootstrapping PostgreSQL 15 + MariaDB (about a minute)"
    local rootfs; rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=postgresql-15,mariadb-server,mariadb-client,python3 \
      bookworm "$rootfs" http://deb.debian.org/debian >/tmp/debootstrap.log 2>&1 \
      || { tail -20 /tmp/debootstrap.log >&2; exit 1; }
    tar -C "$rootfs" -cf "$CACHE/dbbase.tar.tmp" . && mv "$CACHE/dbbase.tar.tmp" "$CACHE/dbbase.tar"
    rm -rf "$rootfs"
  fi
  log "importing $DB_IMAGE"
  docker import -c 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$CACHE/dbbase.tar" "$DB_IMAGE" >/dev/null
}

base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then log "$BASE_IMAGE present"; return; fi
  mkdir -p "$CACHE"
  if [ ! -s "$CACHE/base.tar" ]; then
    log "debootstrapping python3 base (stands in for python:3.11-slim, which no registry serves here)"
    local rootfs; rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian >/tmp/debootstrap-base.log 2>&1 \
      || { tail -20 /tmp/debootstrap-base.log >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$CACHE/base.tar.tmp" . && mv "$CACHE/base.tar.tmp" "$CACHE/base.tar"
    rm -rf "$rootfs"
  fi
  log "importing $BASE_IMAGE"
  docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'ENV LANG=C.UTF-8' \
    "$CACHE/base.tar" "$BASE_IMAGE" >/dev/null
}

main() {
  [ $# -gt 0 ] || set -- all
  for step in "$@"; do
    case "$step" in
      install) install ;;
      dockerd) dockerd_up ;;
      helper-image) helper_image ;;
      db-image) db_image ;;
      base-image) base_image ;;
      all) install; dockerd_up; helper_image; db_image; base_image ;;
      *) echo "usage: $0 [install|dockerd|helper-image|db-image|base-image|all]..." >&2; exit 2 ;;
    esac
  done
}

main "$@"
