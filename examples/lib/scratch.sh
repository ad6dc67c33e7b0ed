# Sourced by the example scripts: a scratch directory to work in (the current directory from
# here on), removed at exit together with the blockd the script started (its pid in $blockd).
work="$(mktemp -d)"
blockd=""
cleanup() { if [ -n "$blockd" ]; then kill "$blockd" 2>/dev/null || true; wait "$blockd" 2>/dev/null || true; fi; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
