#!/usr/bin/env bash
# Creating images with blockdev-create jobs over QMP: a host file, then a qcow2 image laid
# out on it through a file node; the job is watched in query-jobs and dismissed by hand,
# as QEMU requires for create jobs. Needs: npm run build, socat, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

"$here/../bin/blockd" --qmp "unix:$work/qmp.sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
for _ in $(seq 100); do [ -e "$work/blockd.pid" ] && break; sleep 0.05; done

# Each step waits a moment so the job's later events arrive before the next command.
{
  echo '{"execute": "qmp_capabilities"}'
  echo "{\"execute\": \"blockdev-create\", \"arguments\": {\"job-id\": \"mkfile\", \"options\": {\"driver\": \"file\", \"filename\": \"$work/vm.qcow2\", \"size\": 0}}}"
  sleep 0.3
  echo '{"execute": "job-dismiss", "arguments": {"id": "mkfile"}}'
  echo "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"file\", \"node-name\": \"vm-file\", \"filename\": \"$work/vm.qcow2\"}}"
  echo '{"execute": "blockdev-create", "arguments": {"job-id": "mkqcow2", "options": {"driver": "qcow2", "file": "vm-file", "size": 1073741824, "cluster-size": 65536}}}'
  sleep 0.3
  echo '{"execute": "query-jobs"}'
  echo '{"execute": "job-dismiss", "arguments": {"id": "mkqcow2"}}'
  echo '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "vm", "file": "vm-file"}}'
  echo '{"execute": "quit"}'
} | socat - "UNIX-CONNECT:$work/qmp.sock" | tr -d '\r' > "$work/replies"
wait
grep -o '"status": "[a-z]*", "id": "mk[a-z0-9]*"' "$work/replies"     # the jobs' status changes
grep -q '"error"' "$work/replies" && { cat "$work/replies"; exit 1; }
qemu-img info "$work/vm.qcow2" | grep -E '^(file format|virtual size|cluster_size)'
qemu-img check -q "$work/vm.qcow2" && echo "qemu-img check: clean"
