#!/usr/bin/env bash
# One-time, idempotent setup of a rootful podman on a machine without Docker or a registry
# (see ../shared/CONTAINERS.md): installs podman & friends, configures runc and lower ulimits,
# and builds a local Debian base image for BentoML. Steps whose result already exists are skipped.
#
#   RC_BASE_IMAGE    name of the local base image to build   (default localhost/bento-base:bookworm)
#   RC_DEBIAN_IMAGE  name of the debootstrapped Debian image (default localhost/debian:bookworm)
#   RC_WORK_DIR      scratch folder for the rootfs            (default /tmp/rc-oci)
#   RC_PODMAN_CONF   podman drop-in config to write (default /etc/containers/containers.conf.d/50-room-classifier.conf)
#
# Users with a reachable registry need none of this: BentoML's default base image just works.
set -euo pipefail

BASE_IMAGE=${RC_BASE_IMAGE:-localhost/bento-base:bookworm}
DEBIAN_IMAGE=${RC_DEBIAN_IMAGE:-localhost/debian:bookworm}
WORK_DIR=${RC_WORK_DIR:-/tmp/rc-oci}
CONF=${RC_PODMAN_CONF:-/etc/containers/containers.conf.d/50-room-classifier.conf}
PACKAGES="podman buildah runc crun conmon netavark aardvark-dns containernetworking-plugins iptables
  fuse-overlayfs slirp4netns uidmap skopeo debootstrap curl"

log() { printf '[setup_podman] %s\n' "$*"; }
timed() { local start=$SECONDS; "$@"; log "$1: $((SECONDS - start)) s"; }
image_exists() { podman image exists "$1"; }

install_packages() {
    if command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null; then
        log "podman, runc and debootstrap already installed"
        return
    fi
    log "installing podman and friends with apt-get"
    apt-get update -q
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PACKAGES
}

write_containers_conf() {
    # crun refuses hybrid cgroups here (runc works); root cannot raise ulimits above these.
    mkdir -p "$(dirname "$CONF")"
    if grep -qs 'runtime = "runc"' "$CONF"; then
        log "$CONF already selects runc"
        return
    fi
    log "writing $CONF (runc, lowered default ulimits)"
    printf '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n[engine]\nruntime = "runc"\n' >"$CONF"
}

build_debian_image() {
    if image_exists "$DEBIAN_IMAGE"; then
        log "$DEBIAN_IMAGE exists"
        return
    fi
    local mirror rootfs="$WORK_DIR/rootfs"
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    log "debootstrapping Debian bookworm from $mirror into $rootfs"
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*  # ~30 MB nobody needs at run time
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$DEBIAN_IMAGE"
    rm -rf "$rootfs"
}

build_base_image() {
    if image_exists "$BASE_IMAGE"; then
        log "$BASE_IMAGE exists"
        return
    fi
    # What BentoML's generated Dockerfile expects of a custom base: python3 of the build's version with pip
    # (it runs `pip install uv` into the system Python), apt, groupadd. Extra CA certificates are not baked in
    # here: scripts/container/build_image.sh layers them on any base (RC_EXTRA_CA_CERTS).
    log "building $BASE_IMAGE from $DEBIAN_IMAGE"
    podman build -t "$BASE_IMAGE" -f - "$WORK_DIR" <<CONTAINERFILE
FROM $DEBIAN_IMAGE
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
ENV PIP_BREAK_SYSTEM_PACKAGES=1 UV_PYTHON_DOWNLOADS=never
CONTAINERFILE
}

main() {
    [ "$(id -u)" = 0 ] || { log "run as root (rootful podman)"; exit 1; }
    mkdir -p "$WORK_DIR"
    timed install_packages
    timed write_containers_conf
    timed build_debian_image
    timed build_base_image
    log "ready: podman $(podman --version | awk '{print $3}'), base image $BASE_IMAGE"
}

main "$@"
