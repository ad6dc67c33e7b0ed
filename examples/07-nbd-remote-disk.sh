#!/usr/bin/env bash
# A disk on another host: one blockd (the "storage host") exports a qcow2 image over NBD;
# a second blockd attaches it with driver=nbd, puts a local qcow2 overlay on top and
# serves that to a client. Writes go to the overlay; the remote image is only read.
# Needs: npm run build, socat, qemu-utils. (Over a network, use addr.type=inet and
# "server": {"type": "inet", "host": ..., "port": ...}.)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
wait_for() { for _ in $(seq 200); do [ -e "$1" ] && return; sleep 0.05; done; echo "no $1" >&2; exit 1; }
qmp() { socat - "UNIX-CONNECT:$1" | tr -d '\r'; }

qemu-img create -q -f qcow2 "$work/golden.qcow2" 64M
qemu-io -c 'write -P 0x47 0 4M' "$work/golden.qcow2" >/dev/null
qemu-img create -q -f qcow2 "$work/local.qcow2" 64M

"$here/../bin/blockd" \
  --blockdev "driver=qcow2,node-name=golden,file.driver=file,file.filename=$work/golden.qcow2,read-only=on" \
  --nbd-server "addr.type=unix,addr.path=$work/storage.sock" \
  --export type=nbd,id=golden,node-name=golden,name=golden \
  --qmp "unix:$work/storage-qmp.sock" --pidfile "$work/storage.pid" 2>"$work/storage.log" &
wait_for "$work/storage.pid"

"$here/../bin/blockd" --nbd-server "addr.type=unix,addr.path=$work/front.sock" \
  --qmp "unix:$work/front-qmp.sock" --pidfile "$work/front.pid" 2>"$work/front.log" &
wait_for "$work/front.pid"

printf '%s\n' '{"execute": "qmp_capabilities"}' \
  "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"nbd\", \"node-name\": \"remote\", \"read-only\": true, \"server\": {\"type\": \"unix\", \"path\": \"$work/storage.sock\"}, \"export\": \"golden\"}}" \
  "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"qcow2\", \"node-name\": \"vm-disk\", \"file\": {\"driver\": \"file\", \"filename\": \"$work/local.qcow2\"}, \"backing\": \"remote\"}}" \
  '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "vm", "node-name": "vm-disk", "name": "vm", "writable": true}}' \
  | qmp "$work/front-qmp.sock" | grep -c '"return": {}'             # 4 successes

uri="nbd+unix:///vm?socket=$work/front.sock"
qemu-io -f raw -c 'read -P 0x47 0 4M' -c 'write -P 0x4c 1M 64k' -c 'read -P 0x4c 1M 64k' "$uri" | grep -c '^\(read\|wrote\)'

for side in front storage; do
  printf '%s\n' '{"execute": "qmp_capabilities"}' '{"execute": "quit"}' | qmp "$work/$side-qmp.sock" >/dev/null
done
wait
qemu-io -c 'read -P 0x47 1M 64k' "$work/golden.qcow2" >/dev/null && echo "the golden image is unchanged"
qemu-io -c 'read -P 0x4c 1M 64k' "$work/local.qcow2" >/dev/null && echo "the write is in the local overlay"
qemu-img check -q "$work/local.qcow2"
