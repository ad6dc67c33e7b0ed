#!/usr/bin/env bash
# blockdev-reopen the way libvirt uses it: a backing image opened read-only is made
# writable for a while (here to add a persistent dirty bitmap to it, as libvirt does
# before a commit or for checkpoints on a backing layer) and read-only again; the
# overlay's backing link is switched to another image and back; a raw node's window
# (offset, size) of its file is moved; a list whose last entry fails changes nothing; change-backing-file rewrites the name the overlay's
# header records. Needs: npm run build, socat, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib/scratch.sh"

qemu-img create -q -f qcow2 base.qcow2 16M
qemu-io -c 'write -P 0x11 0 4M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 other.qcow2 16M
qemu-io -c 'write -P 0x22 0 4M' other.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qemu-img create -q -f raw parts.raw 2M
qemu-io -f raw -c 'write -P 0x33 0 1M' -c 'write -P 0x44 1M 1M' parts.raw >/dev/null

. "$here/lib/qmp.sh"
sock="$work/qmp.sock"
"$here/../bin/blockd" \
  --blockdev driver=qcow2,node-name=base,read-only=on,file.driver=file,file.node-name=base-file,file.filename=base.qcow2 \
  --blockdev driver=qcow2,node-name=other,read-only=on,file.driver=file,file.node-name=other-file,file.filename=other.qcow2 \
  --blockdev driver=qcow2,node-name=top,backing=base,file.driver=file,file.node-name=top-file,file.filename=top.qcow2 \
  --blockdev driver=raw,node-name=part,offset=0,size=1048576,file.driver=file,file.node-name=parts-file,file.filename=parts.raw \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" --export type=nbd,id=vda,node-name=top,name=vda \
  --export type=nbd,id=part,node-name=part,name=part \
  --qmp "unix:$sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
blockd=$!
wait_for_pidfile "$work/blockd.pid"
uri="nbd+unix:///vda?socket=$work/nbd.sock"

# A persistent bitmap needs a writable image to be stored in: base is made writable, takes one,
# and stores it when it goes back to read-only.
qmp_ok "$sock" '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "base", "file": "base-file", "read-only": false}]}}'
qmp_ok "$sock" '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "base", "name": "b0", "persistent": true}}'
qmp_ok "$sock" '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "base", "file": "base-file", "read-only": true}]}}'
echo "base was writable for a moment: it holds the bitmap b0 and is read-only again"

# The overlay's backing link, switched: the export reads the other image's data through it.
qmp_ok "$sock" '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "other"}]}}'
qemu-io -r -f raw -c 'read -q -P 0x22 0 4M' "$uri"
qmp_ok "$sock" '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "base"}]}}'
qemu-io -r -f raw -c 'read -q -P 0x11 0 4M' "$uri"
echo "top's backing link went to other.qcow2 and back to base.qcow2"

# A raw node shows a window of its file: moved from the first MiB to the second, the export reads it.
part="nbd+unix:///part?socket=$work/nbd.sock"
qemu-io -r -f raw -c 'read -q -P 0x33 0 1M' "$part"
qmp_ok "$sock" '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "part", "file": "parts-file", "offset": 1048576, "size": 1048576}]}}'
qemu-io -r -f raw -c 'read -q -P 0x44 0 1M' "$part"
echo "the raw node 'part' now shows the second MiB of parts.raw"

# All or nothing: the last entry names a node that does not exist, so base stays read-only.
qmp "$sock" '{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "base", "file": "base-file", "read-only": false}, {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "nosuch"}]}}' | grep -q "Cannot find device='' nor node-name='nosuch'"
qmp "$sock" '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}' | tr '{' '\n' | grep '"node-name": "base"' | grep -q '"ro": true'
echo "a list with a failing entry left base read-only"

# The header of top.qcow2 names its backing file as given (the graph is unchanged).
qmp_ok "$sock" "{\"execute\": \"change-backing-file\", \"arguments\": {\"device\": \"top\", \"image-node-name\": \"top\", \"backing-file\": \"$work/base.qcow2\"}}"
qmp "$sock" '{"execute": "quit"}' >/dev/null
wait "$blockd"
blockd=""

qemu-img info top.qcow2 | grep -q "backing file: $work/base.qcow2"
echo "top.qcow2 records its backing file as $work/base.qcow2"
qemu-img info base.qcow2 | grep -q b0
qemu-img check -q base.qcow2 && qemu-img check -q top.qcow2
echo "qemu-img check: clean; base.qcow2 keeps the bitmap b0"
