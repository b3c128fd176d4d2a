#!/usr/bin/env bash
# Stops what .ci/slurm-up.sh started: cancels the jobs still queued or running, then stops slurmd,
# slurmctld and munged by the PIDs slurm-up recorded (TERM, then KILL after 10 s). Safe to run twice.
set -uo pipefail

DIR=${LLMFORGE_SLURM_DIR:-/tmp/llmforge-slurm}
[ -f "$DIR/pids" ] || exit 0

if command -v squeue >/dev/null && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    scancel --full $(squeue -h -o %i) 2>/dev/null
    for _ in $(seq 30); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
fi

alive() {  # running, not a zombie waiting for its parent
    [ -r "/proc/$1/stat" ] && [ "$(cut -d ' ' -f 3 "/proc/$1/stat")" != Z ]
}

# reverse start order: slurmd, slurmctld, then munged
mapfile -t lines < <(tac "$DIR/pids")
for line in "${lines[@]}"; do
    read -r name pid <<<"$line"
    alive "$pid" && kill -TERM "$pid" 2>/dev/null
done
for line in "${lines[@]}"; do
    read -r name pid <<<"$line"
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
        echo "slurm-down: $name ($pid) ignored SIGTERM, sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
done
rm -f "$DIR/pids"
echo "slurm-down: stopped ${#lines[@]} processes (${lines[*]})"
