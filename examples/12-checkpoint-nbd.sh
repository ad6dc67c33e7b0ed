#!/usr/bin/env bash
# A checkpoint flow (pull-mode incremental backup): add a dirty bitmap to a qcow2 node, export
# the node with the bitmap, let a client write through NBD, read what changed with
# nbdinfo --map=qemu:dirty-bitmap:NAME (and qemu-img map over x-dirty-bitmap), copy only the
# dirty ranges, then remove the export and clear the bitmap for the next checkpoint.
# Needs: npm run build, socat, qemu-utils, libnbd-bin.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
fail() { echo "FAILED: $*" >&2; exit 1; }

qemu-img create -q -f qcow2 "$work/disk.qcow2" 16M
"$here/../bin/blockd" --qmp "unix:$work/qmp.sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
for _ in $(seq 100); do [ -e "$work/blockd.pid" ] && break; sleep 0.05; done

# One QMP session per call; prints the replies (the greeting and qmp_capabilities first).
qmp() {
  { echo '{"execute": "qmp_capabilities"}'; printf '%s\n' "$@"; } | socat -t 5 - "UNIX-CONNECT:$work/qmp.sock" | tr -d '\r'
}
expect_ok() { local replies; replies="$(qmp "$1")"; grep -q '"error"' <<<"$replies" && fail "$1 -> $replies"; true; }

expect_ok '{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": "'"$work"'/disk.qcow2"}}}'
expect_ok '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "'"$work"'/nbd.sock"}}}}'
# The checkpoint: from now on every write to "disk" marks bitmap "cp1" (64 KiB granules).
expect_ok '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": "cp1", "granularity": 65536}}'
expect_ok '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp0", "node-name": "disk", "name": "disk", "writable": true, "bitmaps": ["cp1"]}}'
uri="nbd+unix:///disk?socket=$work/nbd.sock"

# While exported, the bitmap is busy: nobody may clear or remove it under the reader.
qmp '{"execute": "block-dirty-bitmap-clear", "arguments": {"node": "disk", "name": "cp1"}}' | grep -q "Bitmap 'cp1' is currently in use" \
  || fail "the exported bitmap was not busy"

# A guest writes 4 KiB at 1 MiB and 100 KiB at 8 MiB + 10 KiB.
qemu-io -f raw -c 'write -P 0x5a 1M 4k' -c 'write -P 0xa5 8202k 100k' -c flush "$uri" >/dev/null

# What changed since the checkpoint, in whole granules: [1 MiB, +64 KiB) and [8 MiB, +128 KiB).
nbdinfo --map=qemu:dirty-bitmap:cp1 "$uri" | tee "$work/map"
expected="$(printf '%s\n' '0 1048576 0' '1048576 65536 1' '1114112 7274496 0' '8388608 131072 1' '8519680 8257536 0')"
[ "$(awk '{print $1, $2, $3}' "$work/map")" = "$expected" ] || fail "unexpected dirty extents"

# QEMU's client reads the same bitmap through x-dirty-bitmap: dirty ranges appear as "data": false.
qemu-img map --output=json --image-opts \
  "driver=nbd,export=disk,server.type=unix,server.path=$work/nbd.sock,x-dirty-bitmap=qemu:dirty-bitmap:cp1" > "$work/qemu-map"
[ "$(grep -c '"data": false' "$work/qemu-map")" = 2 ] || fail "qemu-img map does not show two dirty ranges"

# The incremental backup: copy only the dirty ranges into a sparse file.
truncate -s 16M "$work/incremental.raw"
awk '$3 == 1 {print $1, $2}' "$work/map" | while read -r offset length; do
  qemu-img convert -O raw --image-opts \
    "driver=raw,offset=$offset,size=$length,file.driver=nbd,file.export=disk,file.server.type=unix,file.server.path=$work/nbd.sock" "$work/piece"
  dd if="$work/piece" of="$work/incremental.raw" bs=64k seek="$offset" oflag=seek_bytes conv=notrunc status=none
done
qemu-io -f raw -c 'read -P 0x5a 1M 4k' -c 'read -P 0xa5 8202k 100k' -c 'read -P 0 0 1M' -c 'read -P 0 9M 7M' "$work/incremental.raw" >/dev/null \
  || fail "the incremental copy does not hold exactly the written data"
echo "the incremental copy holds exactly the changed ranges"

# End of the backup: remove the export (the bitmap is free again) and start the next checkpoint.
qmp '{"execute": "block-export-del", "arguments": {"id": "exp0"}}' | grep -q BLOCK_EXPORT_DELETED || fail "export not deleted"
expect_ok '{"execute": "block-dirty-bitmap-clear", "arguments": {"node": "disk", "name": "cp1"}}'
qmp '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}' | grep -q '"name": "cp1", "recording": true, "persistent": false, "busy": false, "granularity": 65536, "count": 0' \
  || fail "cp1 is not clean and free after the export"
echo "export removed; cp1 is free and clean for the next checkpoint"

qmp '{"execute": "quit"}' >/dev/null
wait
qemu-img check -q "$work/disk.qcow2"
qemu-io -c 'read -P 0x5a 1M 4k' -c 'read -P 0xa5 8202k 100k' "$work/disk.qcow2" >/dev/null && echo "the writes are in the image, and qemu-img check is clean"
