#!/usr/bin/env bash
# NBD over TLS: make a CA, a server and a client certificate with openssl, start blockd with
# a TLS-only export that admits only the client's certificate name (authz-simple), then read
# and write it with nbdinfo and qemu-io over TLS. A client without TLS, and one without a
# certificate, are refused. A UNIX socket keeps the example self-contained; across hosts use
# addr.type=inet (the client then checks the server's certificate against the host it dials).
# Needs: npm run build, socat, openssl, qemu-utils, libnbd-bin.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
source "$here/lib/qmp.sh"
source "$here/lib/tls-pki.sh"
fail() { echo "FAILED: $*" >&2; exit 1; }

# The credentials, in QEMU's layout: a directory per end, holding ca-cert.pem and
# server-cert.pem/server-key.pem (or client-cert.pem/client-key.pem).
pki="$work/pki"
make_pki "$pki"

qemu-img create -q -f qcow2 "$work/disk.qcow2" 16M
qemu-io -c 'write -P 0x47 0 1M' "$work/disk.qcow2" >/dev/null

# The client's distinguished name as GnuTLS writes it, "O=Example,CN=client"; on the command
# line a comma inside a value is doubled.
"$here/../bin/blockd" \
  --blockdev "driver=qcow2,node-name=disk,file.driver=file,file.filename=$work/disk.qcow2" \
  --object "tls-creds-x509,id=tls0,dir=$pki/server,endpoint=server" \
  --object "authz-simple,id=auth0,identity=O=Example,,CN=client" \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock,tls-creds=tls0,tls-authz=auth0" \
  --export type=nbd,id=exp0,node-name=disk,name=disk,writable=on \
  --qmp "unix:$work/qmp.sock" --pidfile "$work/blockd.pid" 2>"$work/blockd.log" &
wait_for_pidfile "$work/blockd.pid"

# libnbd: nbds+unix:// is NBD over TLS; tls-certificates is the client's credentials directory.
nbdinfo "nbds+unix:///disk?socket=$work/nbd.sock&tls-certificates=$pki/client" | tee "$work/info"
grep -q 'with TLS' "$work/info" || fail "nbdinfo did not use TLS"

# QEMU's tools: a tls-creds-x509 object for the client end, named by the nbd driver's tls-creds.
# Over a UNIX socket the name the server's certificate must carry is given with tls-hostname.
image="driver=nbd,server.type=unix,server.path=$work/nbd.sock,export=disk,tls-creds=c0,tls-hostname=localhost"
qemu-io --object "tls-creds-x509,id=c0,dir=$pki/client,endpoint=client" --image-opts "$image" \
  -c 'read -P 0x47 0 1M' -c 'write -P 0x5a 4M 64k' -c 'read -P 0x5a 4M 64k' | grep -c '^\(read\|wrote\)'

# Without TLS, and without a client certificate, nobody gets in.
refused="$(qemu-img info -f raw "nbd+unix:///disk?socket=$work/nbd.sock" 2>&1 || true)"
grep 'TLS negotiation required' <<<"$refused" || fail "a client without TLS was served: $refused"
mkdir "$pki/anonymous"; cp "$pki/ca/ca-cert.pem" "$pki/anonymous/"
if qemu-img info --object "tls-creds-x509,id=c0,dir=$pki/anonymous,endpoint=client" \
    --image-opts "$image" >/dev/null 2>&1; then fail "a client without a certificate was served"; fi
grep -o '"reason":"Verify failed: No certificate was found."' "$work/blockd.log"

qmp "$work/qmp.sock" '{"execute": "quit"}' >/dev/null
wait
qemu-io -c 'read -P 0x5a 4M 64k' "$work/disk.qcow2" >/dev/null && echo "the write over TLS is in the image"
qemu-img check -q "$work/disk.qcow2"
