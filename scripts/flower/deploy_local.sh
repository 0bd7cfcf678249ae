#!/usr/bin/env bash
# A real Flower deployment on loopback: one SuperLink and N SuperNodes with TLS
# and SuperNode authentication, one fedmole run with `flwr run`, then shutdown.
#
#   scripts/flower/deploy_local.sh N [WORKDIR]
#
# Environment (all optional):
#   CONFIG      fedmole config                          (configs/tiny.toml)
#   OVERRIDES   extra fedmole overrides, space separated (e.g. "rounds=1 train.local_steps=2")
#   TIERS       tier of each node, space separated      (the config's tiers)
#   PORT        SuperLink HTTPS port                    (a free port)
#   RUN_DIR     run directory                           (WORKDIR/run)
#   TIMEOUT     seconds allowed for the run             (1800)
#   VENV        virtual environment with fedmole[flower] (.venv)
#   SITES       1 = real sites: node i reads only its own data file WORKDIR/sites/site_i/data.jsonl
#               (written by split_sites.py from CONFIG), and the server is given no data at all
#
# Node i gets --node-config "partition-id=i tier=T_i state-dir=WORKDIR/node-state [data-path=...]": it
# serves fedmole client i and keeps that client's state between rounds under WORKDIR/node-state.
# Everything it starts runs in this script's process group and is stopped on exit.
set -euo pipefail
n=${1:?usage: deploy_local.sh N [WORKDIR]}
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${2:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)
venv=${VENV:-$repo/.venv}
export PATH="$venv/bin:$PATH"  # SuperLink and SuperNodes start flower-superexec from PATH
export FLWR_HOME="$work/flwr-home"  # our SuperLink connection, not the user's ~/.flwr
config=${CONFIG:-configs/tiny.toml}
run_dir=${RUN_DIR:-$work/run}
read -r -a tiers <<< "${TIERS:-}"
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=${PORT:-$(free_port)}

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

echo "== certificates and node keys in $work"
"$repo/scripts/flower/make_certs.sh" "$work/certs" >/dev/null
"$repo/scripts/flower/keys.sh" "$work/keys" "$n" >/dev/null
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "fedmole-local"

[superlink.fedmole-local]
address = "127.0.0.1:$port"
root-certificates = "$work/certs/ca.crt"
EOF

echo "== SuperLink on 127.0.0.1:$port (TLS, SuperNode authentication)"
flower-superlink --host 127.0.0.1 --port "$port" \
    --ssl-ca-certfile "$work/certs/ca.crt" --ssl-certfile "$work/certs/server.pem" \
    --ssl-keyfile "$work/certs/server.key" --enable-supernode-auth \
    --disable-runtime-dependency-installation > "$work/superlink.log" 2>&1 &
pids+=($!)

echo "== registering $n SuperNode public keys"
for ((i = 0; i < n; i++)); do
    for attempt in $(seq 60); do  # the first tries wait for the SuperLink to listen
        if flwr supernode register "$work/keys/node_$i.pub" fedmole-local > "$work/register_$i.log" 2>&1; then
            break
        fi
        if [ "$attempt" = 60 ]; then cat "$work/register_$i.log" "$work/superlink.log" >&2; exit 1; fi
        sleep 1
    done
done

echo "== a SuperNode whose key was not registered is refused"
"$repo/scripts/flower/keys.sh" "$work/stranger" 1 >/dev/null
if timeout 120 flower-supernode --superlink "127.0.0.1:$port" --root-certificates "$work/certs/ca.crt" \
    --auth-supernode-private-key "$work/stranger/node_0" --max-retries 0 --max-wait-time 5 \
    --port "$(free_port)" > "$work/stranger.log" 2>&1; then
    echo "an unregistered SuperNode was admitted: node authentication is not enforced" >&2
    exit 1
fi

run_config=""
if [ "${SITES:-0}" = 1 ]; then
    echo "== one data file per site in $work/sites"
    (cd "$repo" && python scripts/flower/split_sites.py "$config" "$work/sites" "data.num_clients=$n" ${OVERRIDES:-}) \
        | sed 's/^/   /'
    # the server is pointed at a file that does not exist: loading client data there would fail the run
    run_config="data.source='$work/no-data-on-the-server.jsonl'"
fi

echo "== $n SuperNodes"
for ((i = 0; i < n; i++)); do
    node_config="partition-id=$i state-dir='$work/node-state'"
    if [ -n "${tiers[i]:-}" ]; then node_config="$node_config tier=${tiers[i]}"; fi
    if [ "${SITES:-0}" = 1 ]; then node_config="$node_config data-path='$work/sites/site_$i/data.jsonl'"; fi
    flower-supernode --superlink "127.0.0.1:$port" --root-certificates "$work/certs/ca.crt" \
        --auth-supernode-private-key "$work/keys/node_$i" --node-config "$node_config" \
        --port "$(free_port)" > "$work/supernode_$i.log" 2>&1 &
    pids+=($!)
done

echo "== flwr run (run directory $run_dir)"
cd "$repo"
timeout "${TIMEOUT:-1800}" flwr run . fedmole-local --stream --run-config \
    "config='$config' out='$run_dir' node-wait=120.0 overrides='data.num_clients=$n ${OVERRIDES:-}' $run_config" \
    > "$work/flwr_run.log" 2>&1 || { tail -40 "$work/flwr_run.log" >&2; exit 1; }
if [ ! -f "$run_dir/summary.json" ]; then
    echo "the run ended without $run_dir/summary.json; logs in $work" >&2
    tail -40 "$work/flwr_run.log" >&2
    exit 1
fi
grep -E "round [0-9]+:|run directory" "$work/flwr_run.log" | sed 's/^/   /' || true
python -c "import json, sys; s = json.load(open(sys.argv[1])); print('   engine', s['engine'], '| metrics', s['metrics'], '| sha256', s['final_state_sha256'][:16])" "$run_dir/summary.json"
if [ "${SITES:-0}" = 1 ]; then
    for ((i = 0; i < n; i++)); do  # what each node's ClientApps read (they log every site file they open)
        echo "   node $i read: $(grep -ho "site data of client [0-9]* from [^ :]*" "$work/supernode_$i.log" | sort -u | tr '\n' ' ')"
    done
fi
echo "== done; shutting down (logs in $work)"
