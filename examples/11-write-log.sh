#!/usr/bin/env bash
# Recording a write log of a disk: a blklogwrites node between the qcow2 node and its file
# logs every write, zero write, discard and flush that reaches the image file, in the
# dm-log-writes format QEMU's blklogwrites filter writes. A client writes through an NBD
# export; the log's superblock then says how many entries it holds, and QEMU's own qemu-io
# continues the same log (log-append). Needs: npm run build, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

qemu-img create -q -f qcow2 "$work/disk.qcow2" 64M
: > "$work/disk.log"   # the log file must exist; a new log starts at its beginning

"$here/../bin/blockd" \
  --blockdev "{\"driver\": \"qcow2\", \"node-name\": \"disk\", \"file\": {\"driver\": \"blklogwrites\",
    \"file\": {\"driver\": \"file\", \"filename\": \"$work/disk.qcow2\"},
    \"log\": {\"driver\": \"file\", \"filename\": \"$work/disk.log\"}}}" \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" \
  --export type=nbd,id=exp0,node-name=disk,name=disk,writable=on \
  --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
for _ in $(seq 100); do [ -e "$work/blockd.pid" ] && break; sleep 0.05; done

# Writeback: qemu-io's default (writethrough) would send every write with FUA.
qemu-io -f raw -t writeback -c 'write -P 0x42 0 1M' -c 'flush' -c 'write -z 4M 64k' -c 'flush' \
  "nbd+unix:///disk?socket=$work/nbd.sock" >/dev/null
kill -TERM "$(cat "$work/blockd.pid")"; wait

entries() { od -A n -t u8 -j 16 -N 8 "$work/disk.log" | tr -d ' '; }   # superblock: magic, version, entries, sector size
echo "blockd logged $(entries) entries (writes, flushes and the flush-seq mark before each flush)"

qemu-io --image-opts -c 'write -P 0x43 1M 64k' \
  "driver=qcow2,file.driver=blklogwrites,file.log-append=on,file.file.driver=file,file.file.filename=$work/disk.qcow2,file.log.driver=file,file.log.filename=$work/disk.log" >/dev/null
echo "after qemu-io continued it: $(entries) entries"

qemu-img check -q "$work/disk.qcow2" && echo "qemu-img check: clean"
