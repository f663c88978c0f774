#!/usr/bin/env bash
# Real containers, end to end (run as root: `make test-containers`):
#   1. install docker.io, docker-compose and debootstrap if missing; start dockerd if it is not running;
#   2. build fed-deq-base:bookworm without a registry (debootstrap + docker import) unless it exists;
#   3. fill a wheelhouse on the host (pip download) and build fed-deq:latest from it, offline;
#   4. pass 1: the compose federation with host networking (all traffic on 127.0.0.1) runs a 4-client,
#      2-round scenario; check the files it writes to ./runs;
#   5. pass 2: the same with the TLS override, and one SuperNode container killed mid-run; the run must
#      still finish every round;
#   6. tear down containers and networks (images are kept for speed; dockerd is stopped if we started it).
# Outputs are copied to runs/containers-plain and runs/containers-tls-kill. Env: FED_DEQ_CACHE (default
# ~/.cache/fed-deq: wheelhouse), PYTHON (default .venv/bin/python), DEBIAN_MIRROR, KEEP_WORK=1,
# FED_DEQ_BASE_IMAGE (default fed-deq-base:bookworm; built by debootstrap when missing).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${FED_DEQ_CACHE:-$HOME/.cache/fed-deq}
python=${PYTHON:-$root/.venv/bin/python}
base_image=${FED_DEQ_BASE_IMAGE:-fed-deq-base:bookworm}
image=fed-deq:latest
project=fed-deq-test
app_uid=10001
started=$(date +%s)
work=$(mktemp -d -t fed-deq-containers.XXXXXX)
dockerd_pid=
compose_files=()

log() { echo "[test-containers +$(($(date +%s) - started))s] $*"; }
fail() { log "FAILED: $*"; exit 1; }

teardown() {
  local status=$?
  if [[ ${#compose_files[@]} -gt 0 ]]; then
    docker-compose -p "$project" "${compose_files[@]}" down --remove-orphans -t 5 >/dev/null 2>&1 || true
  fi
  if [[ -n $dockerd_pid ]]; then
    kill "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" 2>/dev/null || true
  fi
  [[ ${KEEP_WORK:-0} == 1 ]] && log "work folder kept: $work" || rm -rf "$work"
  log "total wall time $(($(date +%s) - started)) s (exit $status)"
}
trap teardown EXIT

ensure_packages() {
  if command -v dockerd >/dev/null && command -v docker-compose >/dev/null && command -v debootstrap >/dev/null; then
    return
  fi
  log "installing docker.io docker-compose debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
}

ensure_dockerd() {
  docker info >/dev/null 2>&1 && return
  log "starting dockerd"
  rm -f /var/run/docker.pid  # a stale pid file from an earlier, killed dockerd blocks the start
  dockerd >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
  fail "dockerd did not start; see $work/dockerd.log"
}

debian_mirror() {
  # The mirror apt already uses (deb822 .sources or a one-line sources.list); DEBIAN_MIRROR overrides it.
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
  [[ -z $uri ]] && uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1 || true)
  uri=${DEBIAN_MIRROR:-$uri}
  [[ -n $uri ]] || fail "no Debian mirror found in apt's sources; set DEBIAN_MIRROR"
  echo "$uri"
}

ensure_base_image() {
  docker image inspect "$base_image" >/dev/null 2>&1 && return
  local rootfs="$work/rootfs" mirror
  mirror=$(debian_mirror)
  log "debootstrap bookworm from $mirror (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || fail "debootstrap; see $work/debootstrap.log"
  tar -C "$rootfs" -c . | docker import - "$base_image" >/dev/null
  rm -rf "$rootfs"
}

fill_wheelhouse() {
  # Wheels for the project's dependencies (torch pinned like the Makefile); cp311 wheels fit bookworm.
  mkdir -p "$cache/wheelhouse"
  "$python" - "$root/pyproject.toml" > "$work/requirements.txt" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("torch==2.13.0")
print("\n".join(d for d in deps if not d.replace(" ", "").startswith("torch")))
PY
  log "wheelhouse $cache/wheelhouse"
  "$python" -m pip download -q -d "$cache/wheelhouse" -r "$work/requirements.txt" 2>"$work/pip.log" \
    || fail "pip download; see $work/pip.log"
}

build_image() {
  local t0=$SECONDS
  BASE_IMAGE=$base_image WHEELHOUSE=$cache/wheelhouse IMAGE=$image bash "$root/docker/build-image.sh" \
    >"$work/build.log" 2>&1 || { tail -20 "$work/build.log"; fail "image build"; }
  log "built $image in $((SECONDS - t0)) s: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')" \
    "(base $(docker image inspect -f '{{.Size}}' "$base_image" | awk '{printf "%.0f MB", $1/1e6}'))"
}

write_scenario() {
  # 4 clients in two tiers (so two different container limits), 2 rounds, bundled digits data.
  cat >"$work/containers.yaml" <<'YAML'
seed: 0
dataset: {name: digits, test_fraction: 0.2, validation_fraction: 0.1, partition: {kind: iid}}
model: {cell: mlp, width: 16, eval_iterations: 10}
fleet:
  tiers:
    - {name: slow, count: 2, compute_gflops: 0.01, bandwidth_mbps: 10}
    - {name: fast, count: 2, compute_gflops: 0.05, bandwidth_mbps: 50}
training: {rounds: 2, clients_per_round: 4, deadline_s: 2.0, min_iterations: 2, max_iterations: 8}
fusion: {rule: quality}
YAML
}

# compose_for DIR RUN_NAME [--tls]: generate the compose file(s) in DIR with a runs/ folder the app user owns.
compose_for() {
  local dir=$1 name=$2
  shift 2
  mkdir -p "$dir/runs"
  chown "$app_uid" "$dir/runs"
  (cd "$root" && "$python" -m tools.cli compose "$work/containers.yaml" --out "$dir/docker-compose.yml" \
    --run-name "$name" "$@") >/dev/null
}

# wait_online CONNECTION COUNT: poll the SuperLink until COUNT SuperNodes are online (the ServerApp
# discovers the fleet once, when the run starts).
wait_online() {
  local connection=$1 count=$2 online=0
  for _ in $(seq 90); do
    online=$(docker-compose -p "$project" "${compose_files[@]}" exec -T superlink \
               flwr supernode list "$connection" --format json 2>/dev/null \
             | "$python" -c 'import json,sys
try: print(sum(n["status"] == "online" for n in json.load(sys.stdin)["nodes"]))
except Exception: print(0)')
    [[ $online -ge $count ]] && return
    sleep 2
  done
  fail "only $online of $count SuperNodes online"
}

# wait_round_one OUT: until the run's progress marker (progress.json, which the ServerApp's recorder rewrites
# beside metrics.jsonl in the mounted runs/ folder) shows round 1 under way.
wait_round_one() {
  local marker="$1/progress.json"
  for _ in $(seq 300); do
    "$python" -c 'import json, sys
p = json.load(open(sys.argv[1]))
sys.exit(0 if p["running_round"] or p["rounds_done"] else 1)' "$marker" 2>/dev/null && return
    sleep 1
  done
  fail "round 1 did not start within 300 s ($marker)"
}

# sample_memory: peak memory of every container of the project while a run is going (for docs/benchmarks.md).
sample_memory() {
  while true; do
    docker stats --no-stream --format '{{.Name}} {{.MemUsage}}' 2>/dev/null | grep "^${project}_" || true
    sleep 3
  done >>"$work/memory.log"
}

# check_run DIR NAME ROUNDS: the run's files exist and metrics.jsonl has every round.
check_run() {
  local out="$1/runs/$2"
  for file in metrics.jsonl summary.json scenario.yaml accuracy.png; do
    [[ -s $out/$file ]] || fail "missing $out/$file"
  done
  "$python" - "$out" "$3" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
records = [json.loads(line) for line in open(f"{out}/metrics.jsonl") if line.strip()]
assert [r["round"] for r in records] == list(range(1, rounds + 1)), records
print("  rounds:", [(r["round"], r["clients_completed"], round(r["accuracy"], 3)) for r in records])
PY
}

run_pass_plain() {
  local dir="$work/plain" t0=$SECONDS
  compose_for "$dir" containers-plain
  compose_files=(-f "$dir/docker-compose.yml" -f "$root/docker/compose.host-network.yml")
  log "pass 1: compose up (host network, plain HTTP on 127.0.0.1)"
  docker-compose -p "$project" "${compose_files[@]}" up -d >"$work/up1.log" 2>&1 || { cat "$work/up1.log"; fail "up"; }
  wait_online fed-deq 4
  sample_memory & local sampler=$!
  timeout 900 docker-compose -p "$project" "${compose_files[@]}" run --rm -T submit >"$work/pass1.log" 2>&1 \
    || { kill $sampler; tail -30 "$work/pass1.log"; fail "pass 1 run"; }
  kill $sampler
  check_run "$dir" containers-plain 2
  docker-compose -p "$project" "${compose_files[@]}" down --remove-orphans -t 5 >/dev/null 2>&1
  rm -rf "$root/runs/containers-plain" && mkdir -p "$root/runs" && cp -r "$dir/runs/containers-plain" "$root/runs/"
  log "pass 1 done in $((SECONDS - t0)) s"
}

run_pass_tls_kill() {
  local dir="$work/tls" t0=$SECONDS victim=supernode-3
  compose_for "$dir" containers-tls-kill --tls
  CERT_OWNER_UID=$app_uid bash "$root/docker/gen-certs.sh" "$dir/certs" >/dev/null 2>&1
  compose_files=(-f "$dir/docker-compose.yml" -f "$dir/docker-compose.tls.yml"
                 -f "$root/docker/compose.host-network.yml")
  log "pass 2: compose up with TLS; $victim will be killed when round 1 starts"
  docker-compose -p "$project" "${compose_files[@]}" up -d >"$work/up2.log" 2>&1 || { cat "$work/up2.log"; fail "up"; }
  wait_online fed-deq-tls 4
  timeout 900 docker-compose -p "$project" "${compose_files[@]}" run --rm -T submit >"$work/pass2.log" 2>&1 &
  local submit=$!
  wait_round_one "$dir/runs/containers-tls-kill"
  sleep 2
  docker-compose -p "$project" "${compose_files[@]}" kill "$victim" >/dev/null 2>&1
  log "killed $victim"
  wait $submit || { tail -30 "$work/pass2.log"; fail "pass 2 run"; }
  check_run "$dir" containers-tls-kill 2
  "$python" - "$dir/runs/containers-tls-kill" <<'PY'
import json, sys
records = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl") if line.strip()]
assert any(r["clients_completed"] < 4 for r in records), "the killed node still replied in every round"
PY
  docker-compose -p "$project" "${compose_files[@]}" down --remove-orphans -t 5 >/dev/null 2>&1
  rm -rf "$root/runs/containers-tls-kill" && cp -r "$dir/runs/containers-tls-kill" "$root/runs/"
  log "pass 2 done in $((SECONDS - t0)) s"
}

report_memory() {
  [[ -s $work/memory.log ]] || return 0
  log "peak memory per container (pass 1):"
  "$python" - "$work/memory.log" <<'PY'
import re, sys
units = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}
peak = {}
for line in open(sys.argv[1]):
    name, usage = line.split(" ", 1)
    m = re.match(r"([\d.]+)(\w+) / ([\d.]+)(\w+)", usage.strip())
    if m:
        used, limit = float(m[1]) * units[m[2]], float(m[3]) * units[m[4]]
        peak[name] = max(peak.get(name, (0, limit)), (used, limit))
for name, (used, limit) in sorted(peak.items()):
    print(f"  {name}: {used:.0f} MiB of {limit:.0f} MiB")
PY
}

[[ $(id -u) == 0 ]] || fail "run as root (installs packages, starts dockerd)"
ensure_packages
ensure_dockerd
ensure_base_image
fill_wheelhouse
build_image
write_scenario
run_pass_plain
report_memory
run_pass_tls_kill
log "images: $(docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep fed-deq | tr '\n' ' ')"
log "PASSED"
