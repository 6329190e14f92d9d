#!/usr/bin/env bash
# Start a scale-out worker (docs/deploy.md, "Fan out across workers"): its own checkout at the
# coordinator's commit, the locked environment, the shared DVC remote, and a Prefect process worker
# on the pool. Runs in the foreground; Ctrl-C stops it.
#
#   scripts/start_worker.sh --repo <git url or path> --commit <sha> --dir <checkout> --remote <DVC remote url>
#                           [--pool statefarm-pool] [--name <worker name>] [--venv <existing venv>]
#
# PREFECT_API_URL must point at the coordinator's Prefect server. Without --venv the checkout gets its
# own .venv from the lock (`make install`).
set -euo pipefail

POOL=statefarm-pool NAME=$(hostname) VENV= REPO= COMMIT= DIR= REMOTE=
while [ $# -gt 0 ]; do
  case "$1" in
    --repo) REPO=$2; shift 2 ;;
    --commit) COMMIT=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --remote) REMOTE=$2; shift 2 ;;
    --pool) POOL=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    *) echo "start_worker: unknown argument $1" >&2; exit 2 ;;
  esac
done
for var in REPO COMMIT DIR REMOTE; do
  [ -n "${!var}" ] || { echo "start_worker: --$(echo "$var" | tr 'A-Z' 'a-z') is required" >&2; exit 2; }
done
[ -n "${PREFECT_API_URL:-}" ] || { echo "start_worker: set PREFECT_API_URL to the coordinator's server" >&2; exit 2; }

[ -d "$DIR/.git" ] || git clone --quiet "$REPO" "$DIR"
git -C "$DIR" fetch --quiet "$REPO" "$COMMIT" 2>/dev/null || git -C "$DIR" fetch --quiet origin
git -C "$DIR" checkout --quiet --detach "$COMMIT"
DIR=$(cd "$DIR" && pwd)
if [ -z "$VENV" ]; then
  make -C "$DIR" install
  VENV=$DIR/.venv
fi
VENV=$(cd "$VENV" && pwd)
# The shared remote, in the checkout's local (untracked) DVC config: the default remote's name stays.
REMOTE_NAME=$(cd "$DIR" && "$VENV/bin/dvc" remote default)
(cd "$DIR" && "$VENV/bin/dvc" remote modify --local "$REMOTE_NAME" url "$REMOTE")

export STATEFARM_CHECKOUT=$DIR STATEFARM_WORKER=$NAME
export PYTHONPATH=$DIR PATH=$VENV/bin:$PATH
echo "worker $NAME: checkout $DIR at $(git -C "$DIR" rev-parse --short HEAD), DVC remote $REMOTE, pool $POOL"
# --limit 1: one stage at a time here, so the pool spreads stages over the workers.
exec "$VENV/bin/prefect" worker start --pool "$POOL" --type process --name "$NAME" --limit 1
