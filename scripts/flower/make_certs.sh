#!/usr/bin/env bash
# Self-signed CA and a SuperLink server certificate for localhost / 127.0.0.1 / ::1.
#
#   scripts/flower/make_certs.sh DIR [EXTRA_SAN ...]
#
# Writes DIR/ca.crt, DIR/ca.key, DIR/server.pem, DIR/server.key. EXTRA_SAN entries
# (e.g. DNS:superlink.example.org or IP:10.0.0.5) are added to the server
# certificate for deployments beyond loopback. For testing only: a real
# federation uses certificates from its own CA.
set -euo pipefail
dir=${1:?usage: make_certs.sh DIR [EXTRA_SAN ...]}
shift
mkdir -p "$dir"
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do san="$san,$extra"; done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days 365 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/CN=fedmole test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -nodes -keyout "$dir/server.key" -out "$dir/server.csr" \
    -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -out "$dir/server.pem" -days 365 -sha256 -extfile "$dir/server.ext" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
chmod 600 "$dir/ca.key" "$dir/server.key"
echo "certificates in $dir: ca.crt (give to SuperNodes and flwr), server.pem + server.key (SuperLink)"
