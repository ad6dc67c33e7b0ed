#!/usr/bin/env bash
# Runs every example; fails on the first that fails. CI runs them through npm test.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for example in "$here"/[0-9][0-9]-*; do
  echo "=== $(basename "$example")"
  "$example"
done
