#!/usr/bin/env bash
# Internal snapshots of a qcow2 disk while a client writes to it over NBD (what
# `virsh snapshot-create --disk-only` does for an internal snapshot, or a
# management tool taking a quick restore point): blockd exports disk.qcow2, the
# client writes, blockdev-snapshot-internal-sync records the disk inside the image
# itself, the client writes on (the snapshot's clusters are copied, never
# overwritten), and blockdev-snapshot-delete-internal-sync drops a snapshot again.
# qemu-img lists the snapshots and reads each one as the disk was when it was taken.
# Needs: npm run build, socat, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib/scratch.sh"

qemu-img create -q -f qcow2 disk.qcow2 64M
qemu-io -c 'write -P 0x11 0 16M' disk.qcow2 >/dev/null

. "$here/lib/qmp.sh"
sock="$work/qmp.sock"
"$here/../bin/blockd" --blockdev driver=qcow2,node-name=disk,file.driver=file,file.filename=disk.qcow2 \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" --export type=nbd,id=vda,node-name=disk,name=vda,writable=on \
  --qmp "unix:$sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
blockd=$!
wait_for_pidfile "$work/blockd.pid"
uri="nbd+unix:///vda?socket=$work/nbd.sock"

qemu-io -f raw -c 'write -q -P 0x22 4M 1M' "$uri"
qemu-img convert -f raw -O raw "$uri" at-monday.raw
qmp_ok "$sock" '{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "disk", "name": "monday"}}'
echo "snapshot monday taken"

qemu-io -f raw -c 'write -q -P 0x33 0 8M' -c 'write -q -P 0x34 32M 64k' "$uri"
qemu-img convert -f raw -O raw "$uri" at-tuesday.raw
qmp_ok "$sock" '{"execute": "blockdev-snapshot-internal-sync", "arguments": {"device": "disk", "name": "tuesday"}}'
echo "snapshot tuesday taken"
qemu-io -f raw -c 'write -q -P 0x44 2M 4M' "$uri"
qemu-img convert -f raw -O raw "$uri" at-end.raw

# The snapshots as query-named-block-nodes lists them, then monday goes again.
qmp "$sock" '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}' | grep -o '"name": "[a-z]*day"' | sort -u
qmp "$sock" '{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {"device": "disk", "name": "monday"}}' | grep -q '"name": "monday"'
echo "snapshot monday deleted"
qmp "$sock" '{"execute": "quit"}' >/dev/null
wait "$blockd"
blockd=""

qemu-img snapshot -l disk.qcow2
qemu-img snapshot -l disk.qcow2 | grep -q tuesday
! qemu-img snapshot -l disk.qcow2 | grep -q monday
qemu-img convert -l snapshot.name=tuesday -O raw disk.qcow2 tuesday.raw
cmp at-tuesday.raw tuesday.raw
echo "snapshot tuesday reads as the disk did when it was taken"
qemu-img compare -q at-end.raw disk.qcow2
echo "the disk itself holds every write since"
qemu-img check -q disk.qcow2
echo "qemu-img check: clean"
qemu-img snapshot -a tuesday disk.qcow2        # back to tuesday, offline
qemu-img compare -q at-tuesday.raw disk.qcow2
echo "reverted to tuesday with qemu-img snapshot -a"
