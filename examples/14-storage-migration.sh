#!/usr/bin/env bash
# Live storage migration between two blockd processes (two hosts), over TLS: the destination
# exports an empty image over NBD, TLS only, to the holder of the client certificate
# (tls-creds-x509 + authz-simple); the source mirrors its disk into that export (an nbd node
# with tls-creds) while a client keeps writing to the disk through the source's own NBD export;
# at READY, job-complete pivots, and the source's export now serves the destination's disk. The destination then holds every
# write the client made, before, during and after the pivot.
# Needs: npm run build, socat, openssl, qemu-utils.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib/qmp.sh"
source "$here/lib/tls-pki.sh"
work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "FAILED: $*" >&2; exit 1; }

# The disk on the source host: 0x11 in its first 32 MiB. An empty image of its size on the destination.
qemu-img create -q -f qcow2 "$work/disk.qcow2" 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 32M' "$work/disk.qcow2" >/dev/null
qemu-img create -q -f qcow2 "$work/destination.qcow2" 64M

# The hosts' credentials: the destination serves with the server certificate, the source dials
# with the client certificate (a CA both trust).
make_pki "$work/pki"

# The destination host: its image, exported writable over NBD with TLS, to the client certificate's
# holder only. Across hosts the server listens on addr.type=inet; a UNIX socket keeps this self-contained.
"$here/../bin/blockd" --qmp "unix:$work/dst-qmp.sock" --pidfile "$work/dst.pid" \
  --blockdev "driver=qcow2,node-name=incoming,file.driver=file,file.filename=$work/destination.qcow2" \
  --object "tls-creds-x509,id=tls0,dir=$work/pki/server,endpoint=server" \
  --object "authz-simple,id=auth0,identity=O=Example,,CN=client" \
  --nbd-server "addr.type=unix,addr.path=$work/dst-nbd.sock,tls-creds=tls0,tls-authz=auth0" \
  --export type=nbd,id=incoming,node-name=incoming,name=incoming,writable=on 2>"$work/dst.log" &
pids+=($!)
# The source host: the disk, exported to its client.
"$here/../bin/blockd" --qmp "unix:$work/src-qmp.sock" --pidfile "$work/src.pid" \
  --blockdev "driver=qcow2,node-name=disk,file.driver=file,file.filename=$work/disk.qcow2" \
  --nbd-server "addr.type=unix,addr.path=$work/src-nbd.sock" \
  --export type=nbd,id=disk,node-name=disk,name=disk,writable=on 2>"$work/src.log" &
pids+=($!)
wait_for_pidfile "$work/dst.pid"
wait_for_pidfile "$work/src.pid"
src="$work/src-qmp.sock"

# The client: writes 1 MiB slots one after the other, each with the next pattern, and notes
# the last pattern it wrote to each slot (a write is noted once the server acknowledged it).
client() {
  local i=0 slot pattern
  while [ ! -e "$work/stop" ]; do
    slot=$((i % 48)); pattern=$((0x20 + i % 0x50))
    qemu-io -f raw -c "write -P $pattern $((slot))M 1M" "nbd+unix:///disk?socket=$work/src-nbd.sock" >/dev/null
    echo "$slot $pattern" >>"$work/written"
    i=$((i + 1))
  done
}
client & client_pid=$!
pids+=($client_pid)

# Without TLS the destination turns the source away.
qmp "$src" '{"execute": "blockdev-add", "arguments": {"driver": "nbd", "node-name": "plain", "export": "incoming", "server": {"type": "unix", "path": "'"$work"'/dst-nbd.sock"}}}' \
  | grep -q 'TLS negotiation required' || fail "the destination served a client without TLS"

# The migration: the destination's export as a node on the source, over TLS (the client end's
# credentials; tls-hostname is the name the server's certificate must carry), then the mirror.
qmp_ok "$src" '{"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "tls0", "dir": "'"$work"'/pki/client", "endpoint": "client"}}'
qmp_ok "$src" '{"execute": "blockdev-add", "arguments": {"driver": "nbd", "node-name": "remote", "export": "incoming", "tls-creds": "tls0", "tls-hostname": "localhost", "server": {"type": "unix", "path": "'"$work"'/dst-nbd.sock"}}}'
qmp_ok "$src" '{"execute": "blockdev-mirror", "arguments": {"job-id": "migrate", "device": "disk", "target": "remote", "sync": "full"}}'
wait_job "$src" migrate ready
echo "in sync; the client goes on writing"
until [ "$(wc -l <"$work/written" 2>/dev/null || echo 0)" -ge 60 ]; do sleep 0.1; done
qmp_ok "$src" '{"execute": "job-complete", "arguments": {"id": "migrate"}}'
wait_job "$src" migrate gone
qmp "$src" '{"execute": "query-block-exports"}' | grep -q '"node-name": "remote"' || fail "the export does not serve the destination"
echo "pivoted: the source's export now serves the destination's disk"
# A few more writes, now straight to the destination.
pivoted_at="$(wc -l <"$work/written")"
until [ "$(wc -l <"$work/written")" -ge $((pivoted_at + 5)) ]; do sleep 0.1; done
touch "$work/stop"; wait "$client_pid"

# Every slot holds the last pattern the client wrote there; the slots it never wrote, the disk's data.
qmp_ok "$work/dst-qmp.sock" '{"execute": "block-export-del", "arguments": {"id": "incoming", "mode": "hard"}}'
qmp_ok "$src" '{"execute": "quit"}'
qmp_ok "$work/dst-qmp.sock" '{"execute": "quit"}'
wait
checks=()
for slot in $(seq 0 63); do
  pattern="$(awk -v s="$slot" '$1 == s {p = $2} END {print p}' "$work/written")"
  if [ -n "$pattern" ]; then checks+=(-c "read -P $pattern ${slot}M 1M")
  elif [ "$slot" -lt 32 ]; then checks+=(-c "read -P 0x11 ${slot}M 1M")
  else checks+=(-c "read -P 0 ${slot}M 1M"); fi
done
qemu-io -f qcow2 "${checks[@]}" "$work/destination.qcow2" >"$work/reads" || fail "qemu-io could not read the destination"
grep -q 'verification failed' "$work/reads" && fail "the destination lacks a write"
[ "$(grep -c '^read ' "$work/reads")" = 64 ] || fail "not every slot was read: $(cat "$work/reads")"
qemu-img check -q "$work/destination.qcow2" || fail "qemu-img check found errors"
echo "the destination holds all $(wc -l <"$work/written") writes the client made; qemu-img check is clean"
