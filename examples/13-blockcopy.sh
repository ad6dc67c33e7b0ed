#!/usr/bin/env bash
# Copying a disk that is in use, and switching to the copy (what `virsh blockcopy --pivot`
# does): blockd exports disk.qcow2 over NBD and a client keeps writing to it while
# blockdev-mirror copies it into copy.qcow2. Once READY (the copy has caught up; new
# writes keep being copied), job-complete puts the copy in the disk's place: the export
# now serves copy.qcow2. The old disk then holds what the disk held at the switch, and the
# copy that plus what the client wrote afterwards. Needs: npm run build, socat, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib/scratch.sh"

qemu-img create -q -f qcow2 disk.qcow2 64M
qemu-io -c 'write -P 0x11 0 32M' -c 'write -z 40M 8M' -c 'write -P 0x12 60M 4M' disk.qcow2 >/dev/null
qemu-img create -q -f qcow2 copy.qcow2 64M        # the target: same size, made beforehand

. "$here/lib/qmp.sh"
sock="$work/qmp.sock"
"$here/../bin/blockd" --blockdev driver=qcow2,node-name=disk,file.driver=file,file.filename=disk.qcow2 \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" --export type=nbd,id=vda,node-name=disk,name=vda,writable=on \
  --qmp "unix:$sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
blockd=$!
wait_for_pidfile "$work/blockd.pid"
uri="nbd+unix:///vda?socket=$work/nbd.sock"

# The target node, then the mirror (sync full; the default copy mode, background) under a
# speed limit (1 MiB/s) that keeps it copying while the client writes.
qmp_ok "$sock" "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"qcow2\", \"node-name\": \"copy\", \"file\": {\"driver\": \"file\", \"filename\": \"$work/copy.qcow2\"}}}"
qmp_ok "$sock" '{"execute": "blockdev-mirror", "arguments": {"job-id": "blockcopy", "device": "disk", "target": "copy", "sync": "full", "speed": 1048576}}'

# The client: 300 scattered 4 KiB writes through the export; the job is still copying after them.
writes=()
for i in $(seq 0 299); do writes+=(-c "write -q -P $((i % 250 + 1)) $(((i * 7919) % 16384 * 4))k 4k"); done
qemu-io -f raw "${writes[@]}" "$uri"
qmp "$sock" '{"execute": "query-jobs"}' | grep -q '"status": "running"'
echo "the client wrote while the copy ran"
# The limit goes (virsh blockjob --bandwidth 0): the copy catches up and stays in sync.
qmp_ok "$sock" '{"execute": "block-job-set-speed", "arguments": {"device": "blockcopy", "speed": 0}}'
wait_job "$sock" blockcopy ready
echo "mirror ready"

# The pivot: the copy takes the disk's place in the export. The old disk node is then free
# to go (a user added it, so a user deletes it), which closes disk.qcow2.
qmp_ok "$sock" '{"execute": "job-complete", "arguments": {"id": "blockcopy"}}'
wait_job "$sock" blockcopy gone
qmp "$sock" '{"execute": "query-block-exports"}' | grep -q '"node-name": "copy"'
echo "the export now serves the copy"
qmp_ok "$sock" '{"execute": "blockdev-del", "arguments": {"node-name": "disk"}}'

# The disk as it was at the switch, and one more write through the export: it goes to the copy.
qemu-img convert -O raw disk.qcow2 at-pivot.raw
qemu-io -f raw -c 'write -P 0x77 8M 1M' "$uri" >/dev/null
qemu-io -f raw -c 'write -P 0x77 8M 1M' at-pivot.raw >/dev/null
qmp "$sock" '{"execute": "quit"}' >/dev/null
wait "$blockd"
blockd=""

qemu-img compare -q at-pivot.raw copy.qcow2
echo "the copy holds the disk as it was at the switch, and the write made after it"
if qemu-io -c 'read -P 0x77 8M 1M' disk.qcow2 >/dev/null 2>&1; then echo "FAILED: the old disk got the write" >&2; exit 1; fi
echo "the old disk did not get it"
qemu-img check -q copy.qcow2
echo "qemu-img check: clean"
