#!/usr/bin/env bash
# A pull backup with an increment (what `virsh backup-begin` does in pull mode, with a
# checkpoint; image fleecing the QEMU 7.x way): for each backup a temporary qcow2 backed by
# the live disk takes the old data (a copy-before-write filter puts it there before a client
# write overwrites it), and a snapshot-access node over the filter is exported over NBD: the
# disk frozen at the backup's start, with the checkpoint bitmap as qemu:dirty-bitmap:NAME.
# The client keeps writing through an export of the filter while a backup program reads:
# nbdcopy pulls the full backup; for the increment it asks nbdinfo for the bitmap's dirty
# extents and reads only those (copy-on-read into a qcow2 backed by the export), then puts
# the increment on the full backup. Needs: npm run build, socat, qemu-utils, libnbd-bin.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib/scratch.sh"

qemu-img create -q -f qcow2 disk.qcow2 64M
qemu-io -c 'write -P 0x11 0 32M' -c 'write -P 0x12 60M 4M' disk.qcow2 >/dev/null

. "$here/lib/qmp.sh"
sock="$work/qmp.sock"
"$here/../bin/blockd" --blockdev driver=qcow2,node-name=disk,file.driver=file,file.filename=disk.qcow2 \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" --qmp "unix:$sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
blockd=$!
wait_for_pidfile "$work/blockd.pid"
vda="nbd+unix:///vda?socket=$work/nbd.sock"        # the client's disk
backup="nbd+unix:///backup?socket=$work/nbd.sock"  # the frozen view the backup program reads

# start_backup N [BITMAP]: the fleecing image, the filter (copying only BITMAP's clusters, if
# given), the view exported as "backup" (with BITMAP as qemu:dirty-bitmap:BITMAP), the client's export.
start_backup() {
  local bitmap="" exported="[]"
  if [ $# -gt 1 ]; then
    bitmap=", \"bitmap\": {\"node\": \"disk\", \"name\": \"$2\"}"
    exported="[{\"node\": \"disk\", \"name\": \"$2\"}]"
  fi
  qemu-img create -q -f qcow2 -b disk.qcow2 -F qcow2 "fleece$1.qcow2"
  qmp_ok "$sock" "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"qcow2\", \"node-name\": \"fleece\", \"file\": {\"driver\": \"file\", \"filename\": \"$work/fleece$1.qcow2\"}, \"backing\": \"disk\"}}"
  qmp_ok "$sock" "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"copy-before-write\", \"node-name\": \"cbw\", \"file\": \"disk\", \"target\": \"fleece\"$bitmap}}"
  qmp_ok "$sock" '{"execute": "blockdev-add", "arguments": {"driver": "snapshot-access", "node-name": "view", "file": "cbw"}}'
  qmp_ok "$sock" "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": \"nbd\", \"id\": \"backup\", \"name\": \"backup\", \"node-name\": \"view\", \"bitmaps\": $exported}}"
  qmp_ok "$sock" '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "vda", "name": "vda", "node-name": "cbw", "writable": true}}'
}

# end_backup: the exports go, then the nodes (in this order: each is in use by the next).
end_backup() {
  qmp "$sock" '{"execute": "block-export-del", "arguments": {"id": "backup"}}' '{"execute": "block-export-del", "arguments": {"id": "vda"}}' >/dev/null
  for _ in $(seq 100); do qmp "$sock" '{"execute": "query-block-exports"}' | grep -q '"id"' || break; sleep 0.05; done
  for node in view cbw fleece; do qmp_ok "$sock" "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": \"$node\"}}"; done
}

# client_writes SEED: 200 scattered 4 KiB writes through the client's export.
client_writes() {
  local writes=()
  for i in $(seq 0 199); do writes+=(-c "write -q -P $(((i + $1) % 250 + 1)) $((((i + $1) * 7919) % 16384 * 4))k 4k"); done
  qemu-io -f raw "${writes[@]}" "$vda"
}

# The checkpoint and the full backup at the same moment: chk0 records every write from now on.
qmp_ok "$sock" '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": "chk0", "persistent": true}}'
start_backup 1
qemu-img convert -f raw -O raw "$vda" at-full.raw   # what the full backup must hold
client_writes 0 &
writer=$!
nbdcopy "$backup" full.raw                          # the backup program, while the client writes
wait "$writer"
end_backup
qemu-img compare -q at-full.raw full.raw
echo "the full backup, pulled with the client writing meanwhile, holds the disk as it was when it started"

# The increment: chk0 stops recording (chk1 takes over, for the next one), and the filter
# copies only chk0's clusters: the rest of the view is not readable, and never copied.
qmp_ok "$sock" '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": "chk1", "persistent": true}}'
qmp_ok "$sock" '{"execute": "block-dirty-bitmap-disable", "arguments": {"node": "disk", "name": "chk0"}}'
start_backup 2 chk0
qemu-img convert -f raw -O raw "$vda" at-inc1.raw
client_writes 77 &
writer=$!
qemu-img create -q -f qcow2 -b "$backup" -F raw inc1.qcow2
reads=()
while read -r offset length type _; do
  [ "$type" = 1 ] && reads+=(-c "read -q $offset $length")
done < <(nbdinfo --map=qemu:dirty-bitmap:chk0 "$backup")
qemu-io -C "${reads[@]}" inc1.qcow2                 # copy-on-read: the dirty extents land in inc1.qcow2
wait "$writer"
end_backup
echo "the increment read ${#reads[@]} dirty extents, not the whole disk"
qemu-img rebase -u -f qcow2 -b full.raw -F raw inc1.qcow2   # restore: the increment on top of the full backup
qemu-img compare -q at-inc1.raw inc1.qcow2
echo "full backup + increment = the disk when the increment started"
qmp "$sock" '{"execute": "quit"}' >/dev/null
wait "$blockd"
blockd=""
qemu-img check -q inc1.qcow2 && qemu-img check -q disk.qcow2
echo "qemu-img check: clean"
