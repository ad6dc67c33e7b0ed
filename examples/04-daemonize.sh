#!/usr/bin/env bash
# Run blockd detached, as a service manager would: --daemonize returns once the daemon is
# ready (exit 0) or failed (exit 1, message on stderr); stop it with SIGTERM.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

"$here/../bin/blockd" --qmp "unix:$work/qmp.sock" --pidfile "$work/blockd.pid" --daemonize
pid="$(cat "$work/blockd.pid")"
echo "blockd running as pid $pid"

printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-version"}' |
  socat -t 1 - "UNIX-CONNECT:$work/qmp.sock" | tr -d '\r'

kill -TERM "$pid"
for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
[ ! -e "$work/blockd.pid" ] && echo "stopped; pid file removed"

# A bad command line fails in the foreground, before detaching.
if "$here/../bin/blockd" --monitor nowhere --daemonize 2>"$work/err"; then exit 1; fi
cat "$work/err"
