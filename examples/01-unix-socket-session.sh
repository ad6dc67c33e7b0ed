#!/usr/bin/env bash
# Start blockd on a UNIX socket, talk QMP to it with socat the way a shell script would,
# then shut it down with quit. Needs: npm run build, socat.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

# The pid file appears once startup has succeeded: a dependable readiness signal.
"$here/../bin/blockd" --chardev "socket,id=qmp0,path=$work/qmp.sock,server=on,wait=off" \
  --monitor qmp0 --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
for _ in $(seq 100); do [ -e "$work/blockd.pid" ] && break; sleep 0.05; done

# One connection: negotiate, ask, quit. socat keeps reading until blockd closes.
replies="$(printf '%s\n' \
  '{"execute": "qmp_capabilities"}' \
  '{"execute": "query-version", "id": "v"}' \
  '{"execute": "query-commands", "id": "c"}' \
  '{"execute": "quit"}' | socat - "UNIX-CONNECT:$work/qmp.sock")"
echo "$replies"

echo "$replies" | grep -q '"package": "blockd ' || { echo "no version reply" >&2; exit 1; }
wait  # blockd exits 0 after quit
[ ! -e "$work/qmp.sock" ] && [ ! -e "$work/blockd.pid" ] && echo "socket and pid file removed"
