#!/usr/bin/env bash
# Thin wrapper so the launcher can be called as launch/tpu_vm.sh.
exec python "$(dirname "$0")/tpu_vm.py" "$@"
