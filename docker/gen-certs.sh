#!/usr/bin/env bash
# Generate TLS material for a fed-deq federation, and optionally SuperNode auth keys.
#
#   bash docker/gen-certs.sh OUT_DIR [NUM_SUPERNODE_KEYS]
#
# OUT_DIR/ca.crt, ca.key        a throwaway certificate authority (EC P-256)
# OUT_DIR/server.pem, server.key  the SuperLink certificate, valid for 127.0.0.1, localhost and superlink
# OUT_DIR/supernode-<i>{,.pub}  (only with NUM_SUPERNODE_KEYS) EC P-384 OpenSSH key pairs for
#                               `flower-supernode --auth-supernode-private-key` / `flwr supernode register`
# Existing files are kept, so the script is idempotent; delete OUT_DIR to rotate.
# CERT_OWNER_UID=<uid> chowns the private keys (mode 0600) to the user the containers run as.
set -euo pipefail

out=${1:?usage: gen-certs.sh OUT_DIR [NUM_SUPERNODE_KEYS]}
num_keys=${2:-0}
days=${CERT_DAYS:-365}
mkdir -p "$out"
cd "$out"

if [[ ! -s ca.crt || ! -s ca.key ]]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=fed-deq test CA" -out ca.crt
fi

if [[ ! -s server.pem || ! -s server.key ]]; then
  openssl ecparam -name prime256v1 -genkey -noout -out server.key
  openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
  # SANs: the loopback name and address the nodes dial, plus the compose service name for bridge networks.
  printf 'subjectAltName=DNS:localhost,DNS:superlink,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
    -extfile server.ext -out server.pem
  rm -f server.csr server.ext ca.srl
fi

for ((i = 0; i < num_keys; i++)); do
  # Flower reads SuperNode identities as OpenSSH EC keys on a NIST curve.
  [[ -s supernode-$i ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "supernode-$i"
done

chmod 0644 ./*.crt ./*.pem ./supernode-*.pub 2>/dev/null || true
chmod 0600 ./*.key 2>/dev/null || true
for ((i = 0; i < num_keys; i++)); do chmod 0600 "supernode-$i"; done
# Containers run as a non-root user (uid 10001 in docker/Dockerfile): give it the private keys it mounts.
if [[ -n ${CERT_OWNER_UID:-} ]]; then
  chown "$CERT_OWNER_UID" ./*.key
  for ((i = 0; i < num_keys; i++)); do chown "$CERT_OWNER_UID" "supernode-$i"; done
fi
openssl verify -CAfile ca.crt server.pem >/dev/null
echo "certificates in $out"
