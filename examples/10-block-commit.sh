#!/usr/bin/env bash
# Folding layers back down with block-commit: base <- mid <- top, made and written by
# qemu-img/qemu-io. First an intermediate commit puts mid's data into base and makes base
# top's backing file; then an active commit moves top's own data into base (READY, then
# job-complete switches top's users over to base). base then reads as top did, and passes
# qemu-img check. Needs: npm run build, socat, qemu-utils.
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

# Intermediate commit (top: mid, named by its file); it ends on its own.
qmp_ok "$sock" "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": \"fold-mid\", \"device\": \"top\", \"top\": \"$work/mid.qcow2\"}}"
wait_job "$sock" fold-mid gone
echo "intermediate commit done"
# Active commit of what is left: READY once base has caught up, then job-complete switches over.
qmp_ok "$sock" '{"execute": "block-commit", "arguments": {"job-id": "fold-top", "device": "top"}}'
wait_job "$sock" fold-top ready
echo "active commit ready"
qmp_ok "$sock" '{"execute": "job-complete", "arguments": {"id": "fold-top"}}'
wait_job "$sock" fold-top gone
echo "active commit done"
qmp "$sock" '{"execute": "quit"}' >/dev/null
wait
qemu-img info top.qcow2 | grep '^backing file:'
qemu-img compare -q before.raw base.qcow2 && echo "base reads as top did"
qemu-img check -q base.qcow2 && echo "qemu-img check: clean"
