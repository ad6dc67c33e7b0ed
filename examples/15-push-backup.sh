#!/usr/bin/env bash
# A push backup with an increment (what `virsh backup-begin` does in push mode, with a
# checkpoint): blockd exports disk.qcow2 over NBD and a client writes to it. A full backup
# starts together with a persistent dirty bitmap (the checkpoint); while it copies, the
# client keeps writing, and the backup still holds the disk as it was when it started (a
# write first copies the old data it overwrites). An incremental backup then copies only
# what the bitmap marks. The full backup with the increment on top reads as the disk did
# when the increment started. Needs: npm run build, socat, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib/scratch.sh"

qemu-img create -q -f qcow2 disk.qcow2 64M
qemu-io -c 'write -P 0x11 0 32M' -c 'write -P 0x12 60M 4M' disk.qcow2 >/dev/null
qemu-img create -q -f qcow2 full.qcow2 64M         # the targets: same size, made beforehand
qemu-img create -q -f qcow2 inc1.qcow2 64M

. "$here/lib/qmp.sh"
sock="$work/qmp.sock"
"$here/../bin/blockd" --blockdev driver=qcow2,node-name=disk,file.driver=file,file.filename=disk.qcow2 \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" --export type=nbd,id=vda,node-name=disk,name=vda,writable=on \
  --qmp "unix:$sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
blockd=$!
wait_for_pidfile "$work/blockd.pid"
uri="nbd+unix:///vda?socket=$work/nbd.sock"

# What the disk reads now: the full backup must hold exactly this.
qemu-img convert -f raw -O raw "$uri" at-full.raw

# The checkpoint (a persistent bitmap, kept in disk.qcow2) and the full backup, at the same
# moment: everything written from now on is in the bitmap, everything before in the backup.
# A speed limit (2 MiB/s) keeps the backup copying while the client writes.
qmp_ok "$sock" '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": "chk0", "persistent": true}}'
qmp_ok "$sock" "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"qcow2\", \"node-name\": \"full\", \"file\": {\"driver\": \"file\", \"filename\": \"$work/full.qcow2\"}}}"
qmp_ok "$sock" '{"execute": "blockdev-backup", "arguments": {"job-id": "backup-full", "device": "disk", "target": "full", "sync": "full", "speed": 2097152}}'

# The client: 200 scattered 4 KiB writes through the export while the backup runs.
writes=()
for i in $(seq 0 199); do writes+=(-c "write -q -P $((i % 250 + 1)) $(((i * 7919) % 16384 * 4))k 4k"); done
qemu-io -f raw "${writes[@]}" "$uri"
qmp "$sock" '{"execute": "query-jobs"}' | grep -q '"status": "running"'
echo "the client wrote while the full backup ran"
qmp_ok "$sock" '{"execute": "block-job-set-speed", "arguments": {"device": "backup-full", "speed": 0}}'
wait_job "$sock" backup-full gone
qmp_ok "$sock" '{"execute": "blockdev-del", "arguments": {"node-name": "full"}}'
echo "full backup done"

# More writes, then the increment: only the clusters chk0 marks are copied.
qemu-io -f raw -c 'write -q -P 0x77 8M 1M' -c 'write -q -P 0x78 50M 64k' "$uri"
qemu-img convert -f raw -O raw "$uri" at-inc1.raw
qmp_ok "$sock" "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"qcow2\", \"node-name\": \"inc1\", \"file\": {\"driver\": \"file\", \"filename\": \"$work/inc1.qcow2\"}}}"
qmp_ok "$sock" '{"execute": "blockdev-backup", "arguments": {"job-id": "backup-inc1", "device": "disk", "target": "inc1", "sync": "incremental", "bitmap": "chk0"}}'
wait_job "$sock" backup-inc1 gone
qmp_ok "$sock" '{"execute": "blockdev-del", "arguments": {"node-name": "inc1"}}'
echo "incremental backup done"
qmp "$sock" '{"execute": "quit"}' >/dev/null
wait "$blockd"
blockd=""

qemu-img compare -q at-full.raw full.qcow2
echo "the full backup holds the disk as it was when it started"
copied=$(qemu-img map --output=json inc1.qcow2 | grep -c '"data": true' || true)
echo "the increment holds $copied extents of data, not the whole disk"
qemu-img rebase -u -f qcow2 -b full.qcow2 -F qcow2 inc1.qcow2   # restore: the increment on top of the full backup
qemu-img compare -q at-inc1.raw inc1.qcow2
echo "full backup + increment = the disk when the increment started"
qemu-img check -q full.qcow2 && qemu-img check -q inc1.qcow2 && qemu-img check -q disk.qcow2
echo "qemu-img check: clean"
qemu-img info disk.qcow2 | grep -q chk0
echo "the checkpoint bitmap chk0 is kept in disk.qcow2 for the next increment"
