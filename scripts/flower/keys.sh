#!/usr/bin/env bash
# SuperNode authentication key pairs: ECDSA on NIST P-384 in OpenSSH format,
# what flwr 1.41 expects (`flower-supernode --auth-supernode-private-key`,
# `flwr supernode register PUBLIC_KEY CONNECTION`).
#
#   scripts/flower/keys.sh DIR N
#
# Writes DIR/node_0 .. DIR/node_{N-1} (private) and DIR/node_i.pub (public).
set -euo pipefail
dir=${1:?usage: keys.sh DIR N}
n=${2:?usage: keys.sh DIR N}
mkdir -p "$dir"
for ((i = 0; i < n; i++)); do
    rm -f "$dir/node_$i" "$dir/node_$i.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedmole-node-$i" -f "$dir/node_$i"
done
echo "$n SuperNode key pairs in $dir (register each node_i.pub with the SuperLink before starting node i)"
