# Helpers the example scripts source: talk QMP to blockd over its UNIX socket with socat,
# one session per call, and wait for a job by polling query-jobs (never for a time).

# qmp SOCKET COMMAND...: runs the commands in one session; prints the replies (and events).
qmp() {
  local socket="$1"; shift
  { echo '{"execute": "qmp_capabilities"}'; printf '%s\n' "$@"; } | socat -t 5 - "UNIX-CONNECT:$socket" | tr -d '\r'
}

# qmp_ok SOCKET COMMAND: runs one command and fails the script when it answers an error.
qmp_ok() {
  local replies
  replies="$(qmp "$1" "$2")"
  if grep -q '"error"' <<<"$replies"; then echo "FAILED: $2 -> $replies" >&2; exit 1; fi
}

# wait_job SOCKET ID STATUS: polls query-jobs until job ID is in STATUS ("gone": no longer listed).
wait_job() {
  local socket="$1" id="$2" status="$3" jobs
  for _ in $(seq 600); do
    jobs="$(qmp "$socket" '{"execute": "query-jobs"}' | grep '"return"')"
    if [ "$status" = gone ]; then
      grep -q "\"id\": \"$id\"" <<<"$jobs" || return 0
    elif grep -q "\"status\": \"$status\", [^}]*\"id\": \"$id\"" <<<"$jobs"; then
      return 0
    fi
    sleep 0.1
  done
  echo "FAILED: job $id never reached $status; last query-jobs: $jobs" >&2
  exit 1
}

# wait_for_pidfile FILE: blockd writes its pid file once it serves.
wait_for_pidfile() {
  for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done
  echo "FAILED: blockd did not start" >&2
  exit 1
}
