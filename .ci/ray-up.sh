#!/usr/bin/env bash
# Starts a real single-node Ray head on this machine for the tests marked `ray`: `ray start --head --block`
# in the background (2 CPUs, no dashboard, its own temp dir), its PID in $LLMFORGE_RAY_DIR/pid and the
# address to connect to in $LLMFORGE_RAY_DIR/address; waits until the head answers. The Ray workers inherit
# this environment: run it where `import llmforge` works (the project's venv). .ci/ray-down.sh stops it.
# Used by .ci/run and `make ray-up`; safe to run again (restarts). RAY: the `ray` command to use.
set -euo pipefail

DIR=${LLMFORGE_RAY_DIR:-/tmp/llmforge-ray}
PORT=${LLMFORGE_RAY_PORT:-6380}
RAY=${RAY:-ray}
HERE=$(cd "$(dirname "$0")" && pwd)

command -v "$RAY" >/dev/null || { echo "ray-up: '$RAY' not found (pip install -e '.[ray]')" >&2; exit 1; }
[ -f "$DIR/pid" ] && "$HERE/ray-down.sh"
mkdir -p "$DIR"
rm -f "$DIR/address"
export RAY_USAGE_STATS_ENABLED=0
# Ray replaces a loopback --node-ip-address by the machine's own address (its ports listen on all interfaces);
# 127.0.0.1 reaches the head all the same.
"$RAY" start --head --block --port="$PORT" --node-ip-address=127.0.0.1 --num-cpus=2 \
    --include-dashboard=false --disable-usage-stats --object-store-memory=300000000 \
    --temp-dir="$DIR/tmp" </dev/null >"$DIR/ray.log" 2>&1 &
echo $! >"$DIR/pid"

for i in $(seq 90); do
    if ! kill -0 "$(cat "$DIR/pid")" 2>/dev/null; then
        echo "ray-up: ray start exited; its log:" >&2
        tail -n 30 "$DIR/ray.log" >&2
        rm -f "$DIR/pid"
        exit 1
    fi
    if "$RAY" status --address "127.0.0.1:$PORT" >/dev/null 2>&1; then
        echo "127.0.0.1:$PORT" >"$DIR/address"
        echo "ray-up: head at 127.0.0.1:$PORT after $SECONDS s (pid $(cat "$DIR/pid")); log $DIR/ray.log," \
             "stop with .ci/ray-down.sh"
        exit 0
    fi
    sleep 2
done
echo "ray-up: the head did not answer within 180 s; its log:" >&2
tail -n 30 "$DIR/ray.log" >&2
"$HERE/ray-down.sh"
exit 1
