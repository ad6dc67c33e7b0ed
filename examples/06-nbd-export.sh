#!/usr/bin/env bash
# NBD exports: serve a qcow2 image over NBD with --nbd-server/--export, read its map with
# nbdinfo, write through it with qemu-io while blockd runs, add a second (read-only) export
# over QMP, then check the image after shutdown. Needs: npm run build, socat, qemu-utils,
# libnbd-bin.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT

qemu-img create -q -f qcow2 "$work/disk.qcow2" 64M
qemu-io -c 'write -P 0x42 0 1M' "$work/disk.qcow2" >/dev/null

"$here/../bin/blockd" \
  --blockdev "driver=qcow2,node-name=disk,file.driver=file,file.filename=$work/disk.qcow2" \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" \
  --export type=nbd,id=exp0,node-name=disk,name=disk,writable=on,description=example \
  --qmp "unix:$work/qmp.sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
for _ in $(seq 100); do [ -e "$work/blockd.pid" ] && break; sleep 0.05; done
uri="nbd+unix:///disk?socket=$work/nbd.sock"

nbdinfo --map "$uri"                                              # 1 MiB of data, the rest a hole
qemu-io -f raw -c 'write -P 0x43 8M 1M' -c 'flush' "$uri" >/dev/null  # a client writes while blockd runs
qemu-io -f raw -c 'read -P 0x42 0 1M' -c 'read -P 0x43 8M 1M' "$uri" | grep -c '^read'

# A second export of the same node, read-only, added over QMP; then the list and a clean quit.
printf '%s\n' \
  '{"execute": "qmp_capabilities"}' \
  '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp1", "node-name": "disk", "name": "snapshot-view"}}' \
  '{"execute": "query-block-exports"}' \
  '{"execute": "quit"}' | socat - "UNIX-CONNECT:$work/qmp.sock" | tr -d '\r' > "$work/replies"
wait
grep -q '"id": "exp1"' "$work/replies" && grep -q 'BLOCK_EXPORT_DELETED' "$work/replies"
echo "exports listed, and deleted at quit"

qemu-img check -q "$work/disk.qcow2"
qemu-io -c 'read -P 0x43 8M 1M' "$work/disk.qcow2" >/dev/null && echo "the write through NBD is in the image, and qemu-img check is clean"
