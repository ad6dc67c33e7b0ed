# make_pki DIR: a CA, a server and a client certificate made with openssl, in QEMU's layout:
# DIR/server holds ca-cert.pem, server-cert.pem and server-key.pem; DIR/client holds
# ca-cert.pem, client-cert.pem and client-key.pem (a tls-creds-x509 object's dir= for each end).
# The server's certificate names localhost and 127.0.0.1; the client's is "O=Example,CN=client".
make_pki() {
  local pki="$1" scratch end purpose names
  scratch="$(mktemp -d)"
  mkdir -p "$pki/ca" "$pki/server" "$pki/client"
  newkey() { echo -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1"; }
  openssl req -x509 $(newkey "$pki/ca/ca-key.pem") -out "$pki/ca/ca-cert.pem" -days 1 -subj "/CN=Example CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  for end in server client; do
    purpose=$([ $end = server ] && echo serverAuth || echo clientAuth)
    names=$([ $end = server ] && echo "subjectAltName=DNS:localhost,IP:127.0.0.1" || true)
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=critical,$purpose" $names > "$scratch/$end.ext"
    openssl req $(newkey "$pki/$end/$end-key.pem") -out "$scratch/$end.csr" -subj "/O=Example/CN=$end" 2>/dev/null
    openssl x509 -req -in "$scratch/$end.csr" -CA "$pki/ca/ca-cert.pem" -CAkey "$pki/ca/ca-key.pem" -CAcreateserial \
      -CAserial "$scratch/ca.srl" -out "$pki/$end/$end-cert.pem" -days 1 -extfile "$scratch/$end.ext" 2>/dev/null
    cp "$pki/ca/ca-cert.pem" "$pki/$end/"
  done
  rm -rf "$scratch"
}
