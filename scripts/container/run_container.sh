#!/usr/bin/env bash
# Run the service image on loopback and wait until BentoML's /readyz answers.
#
#   scripts/container/run_container.sh IMAGE [PORT]      (PORT default 3000; published on 127.0.0.1 only)
#
#   RC_CONTAINER_NAME  container name (default room-classifier); an old container of that name is replaced
#   RC_CONTAINER_TOOL  podman (default) or docker
#   RC_READY_TIMEOUT   seconds to wait for /readyz (default 60)
# Every RC_* variable of this shell (the service's configuration, see service.py) is passed into the container.
# Stop it with: podman rm -f room-classifier
set -euo pipefail

IMAGE=${1:?usage: run_container.sh IMAGE [PORT]}
PORT=${2:-3000}
NAME=${RC_CONTAINER_NAME:-room-classifier}
TOOL=${RC_CONTAINER_TOOL:-podman}
TIMEOUT=${RC_READY_TIMEOUT:-60}

log() { printf '[run_container] %s\n' "$*" >&2; }

service_env_args() {
    local name
    for name in $(compgen -e | grep '^RC_' | grep -v -E '^RC_(CONTAINER_NAME|CONTAINER_TOOL|READY_TIMEOUT)$'); do
        printf -- '--env\n%s\n' "$name"
    done
}

main() {
    local env_args start=$SECONDS
    mapfile -t env_args < <(service_env_args)
    "$TOOL" rm -f "$NAME" >/dev/null 2>&1 || true
    "$TOOL" run -d --name "$NAME" -p "127.0.0.1:$PORT:3000" "${env_args[@]}" "$IMAGE" >/dev/null
    until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do
        if [ $((SECONDS - start)) -ge "$TIMEOUT" ] || [ "$("$TOOL" inspect -f '{{.State.Running}}' "$NAME")" != true ]; then
            log "not ready after $((SECONDS - start)) s; container log:"
            "$TOOL" logs "$NAME" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "$NAME ($IMAGE) ready on http://127.0.0.1:$PORT after $((SECONDS - start)) s"
}

main "$@"
