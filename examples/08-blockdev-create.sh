#!/usr/bin/env bash
# Creating images with blockdev-create jobs over QMP: a host file, then a qcow2 image laid
# out on it through a file node; the job is watched in query-jobs and dismissed by hand,
# as QEMU requires for create jobs. Needs: npm run build, socat, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

. "$here/lib/qmp.sh"
sock="$work/qmp.sock"
"$here/../bin/blockd" --qmp "unix:$sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
wait_for_pidfile "$work/blockd.pid"

# A host file first; a create job stays "concluded" until dismissed, as QEMU requires.
qmp_ok "$sock" "{\"execute\": \"blockdev-create\", \"arguments\": {\"job-id\": \"mkfile\", \"options\": {\"driver\": \"file\", \"filename\": \"$work/vm.qcow2\", \"size\": 0}}}"
wait_job "$sock" mkfile concluded
qmp_ok "$sock" '{"execute": "job-dismiss", "arguments": {"id": "mkfile"}}'
# Then a qcow2 image laid out on it through a file node.
qmp_ok "$sock" "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"file\", \"node-name\": \"vm-file\", \"filename\": \"$work/vm.qcow2\"}}"
qmp_ok "$sock" '{"execute": "blockdev-create", "arguments": {"job-id": "mkqcow2", "options": {"driver": "qcow2", "file": "vm-file", "size": 1073741824, "cluster-size": 65536}}}'
wait_job "$sock" mkqcow2 concluded
qmp "$sock" '{"execute": "query-jobs"}' | grep '"return": \['
qmp_ok "$sock" '{"execute": "job-dismiss", "arguments": {"id": "mkqcow2"}}'
qmp_ok "$sock" '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "vm", "file": "vm-file"}}'
qmp "$sock" '{"execute": "quit"}' >/dev/null
wait
qemu-img info "$work/vm.qcow2" | grep -E '^(file format|virtual size|cluster_size)'
qemu-img check -q "$work/vm.qcow2" && echo "qemu-img check: clean"
