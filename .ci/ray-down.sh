#!/usr/bin/env bash
# Stops what .ci/ray-up.sh started, by the PID it recorded: SIGTERM to `ray start --block`, which drains the
# node and stops the head's processes (GCS, raylet, workers); SIGKILL after 60 s. Safe to run twice.
set -uo pipefail

DIR=${LLMFORGE_RAY_DIR:-/tmp/llmforge-ray}
[ -f "$DIR/pid" ] || exit 0
pid=$(cat "$DIR/pid")

alive() {  # running, not a zombie waiting for its parent
    [ -r "/proc/$1/stat" ] && [ "$(cut -d ' ' -f 3 "/proc/$1/stat")" != Z ]
}

kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)  # GCS, raylet, ...: killed by PID if ray start hangs
alive "$pid" && kill -TERM "$pid" 2>/dev/null
for _ in $(seq 600); do alive "$pid" || break; sleep 0.1; done
if alive "$pid"; then
    echo "ray-down: ray start ($pid) still running after 60 s, sending SIGKILL to it and to $kids" >&2
    kill -KILL "$pid" $kids 2>/dev/null
fi
rm -f "$DIR/pid" "$DIR/address"
echo "ray-down: stopped the Ray head (pid $pid)"
