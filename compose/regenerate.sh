#!/usr/bin/env bash
# Rewrite the committed stacks with this checkout's `ftkit compose`. Their image tags are
# content tags of the ftkit sources, so every change under toolkit/ftkit changes them:
# run this (and commit compose/) whenever tests/unit/test_compose.py says they differ.
# The containers' user is written as 1000:1000; set FTKIT_UID/FTKIT_GID in a stack's .env
# to your own (`id -u`, `id -g`) before running it.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
while read -r recipe machine dir; do
  case "$recipe" in ""|\#*) continue ;; esac
  rm -rf "compose/$dir/run/configs"  # configs of steps the recipe no longer has must not linger
  env -u FTKIT_LEASE_DIR -u FTKIT_SIMULATED_GPUS "$python" -m ftkit compose "recipes/$recipe" \
    --machine "recipes/machines/$machine" -o "compose/$dir" --user 1000:1000 --force >/dev/null
  echo "compose/$dir"
done < compose/stacks.txt
