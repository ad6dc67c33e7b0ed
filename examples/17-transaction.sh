#!/usr/bin/env bash
# A disk-only snapshot of three disks plus a checkpoint, all in one `transaction` (what
# libvirt's `virsh snapshot-create --disk-only` with a checkpoint sends): each disk gets a new
# qcow2 overlay that takes over its exports, and a dirty bitmap on the first new overlay,
# created by an earlier action of the same transaction, starts counting writes at that very
# instant. Then a transaction whose last action fails: nothing of it remains (the overlay
# file it made stays on disk, as QEMU leaves it). Needs: npm run build, socat, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib/scratch.sh"

for disk in a b c; do
  qemu-img create -q -f qcow2 "$disk.qcow2" 16M
  qemu-io -c "write -P 0x11 0 1M" "$disk.qcow2" >/dev/null
done

. "$here/lib/qmp.sh"
sock="$work/qmp.sock"
"$here/../bin/blockd" \
  --blockdev driver=qcow2,node-name=a,file.driver=file,file.filename=a.qcow2 \
  --blockdev driver=qcow2,node-name=b,file.driver=file,file.filename=b.qcow2 \
  --blockdev driver=qcow2,node-name=c,file.driver=file,file.filename=c.qcow2 \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" \
  --export type=nbd,id=vda,node-name=a,name=vda,writable=on \
  --export type=nbd,id=vdb,node-name=b,name=vdb,writable=on \
  --export type=nbd,id=vdc,node-name=c,name=vdc,writable=on \
  --qmp "unix:$sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
blockd=$!
wait_for_pidfile "$work/blockd.pid"

# One transaction: three overlays, and the checkpoint bitmap on the first one (made two lines above).
snap() { echo '{"type": "blockdev-snapshot-sync", "data": {"node-name": "'"$1"'", "snapshot-file": "'"$work/$1-snap.qcow2"'", "snapshot-node-name": "'"$1"'-snap"}}'; }
qmp_ok "$sock" '{"execute": "transaction", "arguments": {"actions": [
  '"$(snap a)"', '"$(snap b)"', '"$(snap c)"',
  {"type": "block-dirty-bitmap-add", "data": {"node": "a-snap", "name": "checkpoint1"}}]}}'

# The exports now write into the overlays; the old images are frozen (read-only backing files).
qemu-io -f raw -c 'write -P 0x77 2M 64k' "nbd+unix:///vda?socket=$work/nbd.sock" >/dev/null
nodes="$(qmp "$sock" '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}')"
for disk in a b c; do
  grep -q "\"backing-filename\": \"$disk.qcow2\"" <<<"$nodes" || { echo "FAILED: $disk-snap does not sit on $disk.qcow2" >&2; exit 1; }
done
grep -q '"name": "checkpoint1", "recording": true, "persistent": false, "busy": false, "granularity": 65536, "count": 65536' <<<"$nodes" \
  || { echo "FAILED: the checkpoint did not count the 64 KiB written after it" >&2; exit 1; }
qemu-io -r -U -c 'read -P 0 2M 64k' a.qcow2 >/dev/null || { echo "FAILED: the snapshot a.qcow2 changed" >&2; exit 1; }
echo "three overlays and a checkpoint, in one transaction"

# All or nothing: the second snapshot of a names a node that does not exist, so the first is undone.
before="$(qmp "$sock" '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}' | grep '"return"')"
replies="$(qmp "$sock" '{"execute": "transaction", "arguments": {"actions": [
  {"type": "blockdev-snapshot-sync", "data": {"node-name": "b-snap", "snapshot-file": "'"$work"'/b-snap2.qcow2", "snapshot-node-name": "b-snap2"}},
  {"type": "block-dirty-bitmap-remove", "data": {"node": "a-snap", "name": "checkpoint1"}},
  {"type": "blockdev-snapshot-sync", "data": {"node-name": "nowhere", "snapshot-file": "'"$work"'/x.qcow2", "snapshot-node-name": "x"}}]}}')"
grep -q "Cannot find device='' nor node-name='nowhere'" <<<"$replies" || { echo "FAILED: unexpected reply: $replies" >&2; exit 1; }
after="$(qmp "$sock" '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}' | grep '"return"')"
[ "$before" = "$after" ] || { echo "FAILED: the failed transaction left changes" >&2; exit 1; }
[ -e b-snap2.qcow2 ] || { echo "FAILED: expected the overlay file to stay, as QEMU leaves it" >&2; exit 1; }
echo "the failed transaction left the graph and the checkpoint as they were"
