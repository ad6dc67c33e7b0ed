#!/usr/bin/env bash
# Pulling a backing chain into the top image with block-stream: base <- mid <- top, made and
# written by qemu-img/qemu-io; blockd streams mid's data into top and makes base the backing
# file. The result reads exactly as before and passes qemu-img check.
# Needs: npm run build, socat, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cd "$work"

qemu-img create -q -f qcow2 base.qcow2 64M && qemu-io -c 'write -P 1 0 16M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 && qemu-io -c 'write -P 2 8M 16M' mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 && qemu-io -c 'write -P 3 12M 1M' top.qcow2 >/dev/null
qemu-img convert -O raw top.qcow2 before.raw

. "$here/lib/qmp.sh"
sock="$work/qmp.sock"
"$here/../bin/blockd" --blockdev driver=qcow2,node-name=top,file.driver=file,file.filename=top.qcow2 \
  --qmp "unix:$sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
wait_for_pidfile "$work/blockd.pid"

# The job (base named by its file); it ends on its own (auto-dismiss), then quit.
qmp_ok "$sock" "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": \"pull\", \"device\": \"top\", \"base\": \"$work/base.qcow2\"}}"
wait_job "$sock" pull gone
echo "stream done"
qmp "$sock" '{"execute": "quit"}' >/dev/null
wait
qemu-img info top.qcow2 | grep '^backing file:'
qemu-img compare -q before.raw top.qcow2 && echo "top reads as before"
qemu-img check -q top.qcow2 && echo "qemu-img check: clean"
