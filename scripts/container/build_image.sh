#!/usr/bin/env bash
# Build the bento and containerize it: `bentoml build` + `bentoml containerize`, run from the repo root.
# Prints the image name on the last line of stdout.
#
#   RC_BASE_IMAGE      base image for the bento (default: BentoML's own, python:3.11-slim), e.g.
#                      localhost/bento-base:bookworm from scripts/container/setup_podman.sh
#   RC_EXTRA_CA_CERTS  folder of extra CA certificates (*.crt) that the image build must trust (TLS inspection,
#                      corporate proxies); they are layered onto the base image before pip runs
#   RC_IMAGE           image name without tag (default localhost/room-classifier); the tag is the bento version
#   RC_CONTAINER_TOOL  podman (default) or docker: builds the CA layer and is the containerize backend
#   BENTOML_HOME       the BentoML home holding the room_classifier model (BentoML's default if unset)
#   BENTOML, PYTHON    the bentoml and python to use (default: the repo's .venv, else PATH)
#
# The committed bentofile.yaml is never edited: overrides go into a temporary copy passed with `-f`.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${RC_IMAGE:-localhost/room-classifier}
TOOL=${RC_CONTAINER_TOOL:-podman}
BASE_IMAGE=${RC_BASE_IMAGE:-}
CA_DIR=${RC_EXTRA_CA_CERTS:-}
VENV_BIN="$REPO_ROOT/.venv/bin"  # the project's venv when there is one, else whatever is on PATH
[ -x "$VENV_BIN/bentoml" ] || VENV_BIN=""
BENTOML=${BENTOML:-${VENV_BIN:+$VENV_BIN/}bentoml}
PYTHON=${PYTHON:-${VENV_BIN:+$VENV_BIN/}python}
export BENTOML_DO_NOT_TRACK=${BENTOML_DO_NOT_TRACK:-true}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { printf '[build_image] %s\n' "$*" >&2; }

# Layer the extra CA certificates onto the base image and make pip, uv and requests trust the system store.
build_ca_base() {
    local from=${BASE_IMAGE:-python:3.11-slim} ca_image="${IMAGE}-base:extra-ca"
    local certs=("$CA_DIR"/*.crt) start=$SECONDS
    [ -e "${certs[0]}" ] || { log "RC_EXTRA_CA_CERTS=$CA_DIR holds no *.crt file"; exit 1; }
    mkdir -p "$WORK/ca" && cp "${certs[@]}" "$WORK/ca/"
    log "adding ${#certs[@]} CA certificate(s) from $CA_DIR to $from -> $ca_image"
    "$TOOL" build -q -t "$ca_image" -f - "$WORK/ca" >&2 <<CONTAINERFILE
FROM $from
USER root
COPY *.crt /usr/local/share/ca-certificates/
RUN update-ca-certificates
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt UV_NATIVE_TLS=1
CONTAINERFILE
    log "CA layer ready in $((SECONDS - start)) s"
    BASE_IMAGE=$ca_image
}

# bentofile.yaml plus a docker.base_image override, written to a temporary file.
write_bentofile() {
    local out="$WORK/bentofile.yaml"
    "$PYTHON" - "$REPO_ROOT/bentofile.yaml" "$out" "$BASE_IMAGE" <<'PY'
import sys, yaml
source, target, base_image = sys.argv[1:]
config = yaml.safe_load(open(source))
if base_image:
    config.setdefault("docker", {})["base_image"] = base_image
yaml.safe_dump(config, open(target, "w"), sort_keys=False)
PY
    echo "$out"
}

main() {
    cd "$REPO_ROOT"
    [ -z "$CA_DIR" ] || build_ca_base
    local bentofile tag start=$SECONDS
    bentofile=$(write_bentofile)
    log "bentoml build (base image: ${BASE_IMAGE:-BentoML default})"
    tag=$("$BENTOML" build -f "$bentofile" -o tag | tail -n 1)
    tag=${tag#__tag__:}
    log "built bento $tag in $((SECONDS - start)) s"
    start=$SECONDS
    "$BENTOML" containerize --backend "$TOOL" "$tag" -t "$IMAGE:${tag#*:}" >&2
    log "containerized $IMAGE:${tag#*:} in $((SECONDS - start)) s"
    echo "$IMAGE:${tag#*:}"
}

main "$@"
