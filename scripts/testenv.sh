#!/usr/bin/env bash
# Install and start what backupd's integration tests need on Debian 12, as root.
# Idempotent: every step checks first and does nothing when already done.
#
#   install       Debian packages (Docker engine and Compose, busybox-static, debootstrap, OpenSSH, zstd, age, pigz, peers)
#   dockerd       start the Docker engine if it does not answer (no systemd on these machines)
#   helper-image  backupd-helper:test = static busybox + the host's GNU tar (no registry needed)
#   db-image      dbbase:test = Debian bookworm with PostgreSQL 15, MariaDB, Redis, python3 (debootstrap, cached)
#   base-image    backupd-base:test = Debian bookworm with python3 + venv: the Dockerfile's base in tests
#                 (stands in for python:3.11-slim, which no registry serves here)
#   all           all of the above, in that order
#
# Tags and cache can be overridden (for testing this script): HELPER_IMAGE, DB_IMAGE, TESTENV_CACHE.
set -euo pipefail

HELPER_IMAGE=${HELPER_IMAGE:-backupd-helper:test}
DB_IMAGE=${DB_IMAGE:-dbbase:test}
BASE_IMAGE=${BASE_IMAGE:-backupd-base:test}
CACHE=${TESTENV_CACHE:-/var/cache/backupd-test}
# restic, borgbackup: peers for benchmarks/; python3-venv: .ci/run's venv if python3 is Debian's.
# postgresql-client, redis-tools: pg_dump and redis-cli for databases reached over the network (host: entries).
APT_PACKAGES=(docker.io docker-compose busybox-static debootstrap openssh-server openssh-client zstd age pigz time
              restic borgbackup python3-venv postgresql-client redis-tools)
DB_PACKAGES=postgresql-15,mariadb-server,python3,redis-server
DB_PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
BUSYBOX_APPLETS=(sh find ls cat rm mkdir sleep head echo true false env stat chmod chown wc sync
                 tail cp mv ln touch id gzip gunzip sha256sum dd grep xargs kill printf test du)
# Bump when the recipe changes: an image or cache built by an older recipe is rebuilt.
HELPER_RECIPE="helper-v1"
DB_RECIPE="dbbase-v2:$DB_PACKAGES"   # no spaces: used as a LABEL value

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-o DPkg::Lock::Timeout=600 -q)   # wait for a background apt instead of failing

log() { printf '[testenv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Run one phase, printing how long it took.
phase() {
  local name=$1 start=$SECONDS; shift
  log "== $name"
  "$@"
  log "== $name done in $((SECONDS - start))s"
}

# The label an image was built with ("" when missing or unlabelled).
image_recipe() {
  docker image inspect -f '{{index .Config.Labels "backupd.recipe"}}' "$1" 2>/dev/null || true
}

do_install() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "all packages installed"; return; fi
  log "installing: ${missing[*]}"
  apt-get "${APT_OPTS[@]}" update >/tmp/testenv-apt.log 2>&1 || { tail -20 /tmp/testenv-apt.log >&2; die "apt-get update failed"; }
  apt-get "${APT_OPTS[@]}" install -y "${missing[@]}" >>/tmp/testenv-apt.log 2>&1 \
    || { tail -30 /tmp/testenv-apt.log >&2; die "apt-get install failed (full log: /tmp/testenv-apt.log)"; }
}

do_dockerd() {
  command -v dockerd >/dev/null || die "dockerd missing: run '$0 install' first"
  if docker info >/dev/null 2>&1; then log "docker engine answering"; return; fi
  # Start one only if none is running yet (one may be starting up right now).
  if ! pgrep -x dockerd >/dev/null; then
    log "starting dockerd (log: /tmp/dockerd.log)"
    # setsid + </dev/null: the engine must outlive this script and CI's process group.
    setsid dockerd </dev/null >>/tmp/dockerd.log 2>&1 9>&- &   # 9>&-: not our lock
  fi
  local deadline=$((SECONDS + 60))
  until docker info >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      tail -20 /tmp/dockerd.log >&2 || true
      die "Docker engine not ready after 60s (see /tmp/dockerd.log above)"
    fi
    sleep 1
  done
  log "docker engine ready: $(docker info -f '{{.ServerVersion}} {{.Driver}}')"
}

do_helper_image() {
  if [ "$(image_recipe "$HELPER_IMAGE")" = "$HELPER_RECIPE" ]; then log "$HELPER_IMAGE present"; return; fi
  local busybox=/bin/busybox tar_bin root f a
  [ -x "$busybox" ] || die "$busybox missing: run '$0 install' first"
  # A dynamic busybox would need libs we do not copy: insist on busybox-static.
  if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is dynamically linked; install busybox-static"; fi
  tar_bin=$(command -v tar)
  tar --version | head -1 | grep -q 'GNU tar' || die "host tar is not GNU tar"

  root=$(mktemp -d /tmp/backupd-helper.XXXXXX)
  mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/data"
  chmod 1777 "$root/tmp"
  cp "$busybox" "$root/bin/busybox"
  for a in "${BUSYBOX_APPLETS[@]}"; do ln -s busybox "$root/bin/$a"; done
  # GNU tar (not busybox's): backups need --sparse, --numeric-owner, --xattrs, --format=posix.
  cp -L "$tar_bin" "$root/bin/tar"
  # Its shared libraries and the dynamic loader, at the exact paths ldd reports.
  for f in $(ldd "$tar_bin" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
  done
  # Minimal account files so tools that look up ids do not fail.
  printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

  log "importing $HELPER_IMAGE"
  tar -C "$root" --numeric-owner --owner=0 --group=0 -c . \
    | docker import -c 'ENV PATH=/bin' -c "LABEL backupd.recipe=$HELPER_RECIPE" - "$HELPER_IMAGE" >/dev/null
  rm -rf "$root"

  # Prove it: GNU tar runs, and busybox applets work.
  local version listing
  version=$(docker run --rm "$HELPER_IMAGE" tar --version | head -1) || true
  listing=$(docker run --rm "$HELPER_IMAGE" sh -c 'find / -maxdepth 0') || true
  if [[ "$version" != *"GNU tar"* || "$listing" != "/" ]]; then
    docker image rm -f "$HELPER_IMAGE" >/dev/null 2>&1 || true
    die "$HELPER_IMAGE failed its check (tar --version: '$version'; find: '$listing')"
  fi
  log "$HELPER_IMAGE ok: $version"
}

do_db_image() {
  if [ "$(image_recipe "$DB_IMAGE")" = "$DB_RECIPE" ]; then log "$DB_IMAGE present"; return; fi
  mkdir -p "$CACHE"
  local tarball="$CACHE/dbbase.tar"
  # The cached rootfs is reused only if it was made by this recipe.
  if [ ! -s "$tarball" ] || [ "$(cat "$tarball.recipe" 2>/dev/null)" != "$DB_RECIPE" ]; then
    command -v debootstrap >/dev/null || die "debootstrap missing: run '$0 install' first"
    local rootfs; rootfs=$(mktemp -d /tmp/backupd-dbbase.XXXXXX)
    log "debootstrap bookworm with $DB_PACKAGES (log: /tmp/debootstrap-dbbase.log)"
    if ! debootstrap --variant=minbase --include="$DB_PACKAGES" \
        bookworm "$rootfs" http://deb.debian.org/debian >/tmp/debootstrap-dbbase.log 2>&1; then
      tail -30 /tmp/debootstrap-dbbase.log >&2
      rm -rf "$rootfs"
      die "debootstrap failed"
    fi
    rm -f "$rootfs"/var/cache/apt/archives/*.deb   # downloaded packages: not needed in the image
    # Write under a temporary name, then rename: a killed run never leaves a half tarball.
    tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp.$$" .
    rm -rf "$rootfs"
    mv "$tarball.tmp.$$" "$tarball"
    printf '%s' "$DB_RECIPE" >"$tarball.recipe"
  else
    log "using cached rootfs $tarball"
  fi
  log "importing $DB_IMAGE"
  docker import -c "ENV PATH=$DB_PATH" -c 'ENV LANG=C.UTF-8' -c "LABEL backupd.recipe=$DB_RECIPE" \
    "$tarball" "$DB_IMAGE" >/dev/null
  docker run --rm "$DB_IMAGE" sh -c 'command -v initdb && command -v mariadbd && command -v redis-server && python3 --version' >&2 \
    || die "$DB_IMAGE lacks initdb, mariadbd, redis-server or python3"
}

do_base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then log "$BASE_IMAGE present"; return; fi
  if [ ! -s "$CACHE/base.tar" ]; then
    log "debootstrapping the python3 base image"
    local rootfs; rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian >/tmp/debootstrap-base.log 2>&1 \
      || { tail -20 /tmp/debootstrap-base.log >&2; die "debootstrap of the base image failed"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$CACHE/base.tar.tmp" . && mv "$CACHE/base.tar.tmp" "$CACHE/base.tar"
    rm -rf "$rootfs"
  fi
  log "importing $BASE_IMAGE"
  docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'ENV LANG=C.UTF-8' \
    "$CACHE/base.tar" "$BASE_IMAGE" >/dev/null
}

main() {
  [ "$(id -u)" -eq 0 ] || die "run as root"
  [ $# -gt 0 ] || set -- all
  # One run at a time on this machine: two concurrent image builds would race on the same tags and cache.
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock -n 9 || { log "another testenv.sh is running; waiting for it"; flock -w 1800 9 || die "lock wait timed out"; }
  local step
  for step in "$@"; do
    case "$step" in
      install)      phase install do_install ;;
      dockerd)      phase dockerd do_dockerd ;;
      helper-image) phase helper-image do_helper_image ;;
      db-image)     phase db-image do_db_image ;;
      base-image)   phase base-image do_base_image ;;
      all)          phase install do_install; phase dockerd do_dockerd
                    phase helper-image do_helper_image; phase db-image do_db_image
                    phase base-image do_base_image ;;
      *) echo "usage: $0 [install|dockerd|helper-image|db-image|base-image|all]..." >&2; exit 2 ;;
    esac
  done
}

main "$@"
