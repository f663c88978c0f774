#!/usr/bin/env bash
# Build the fed-deq image from a small staged context (the checkout's .venv and runs/ never reach Docker).
#
#   bash docker/build-image.sh                        # online: python:3.11-slim + PyPI
#   BASE_IMAGE=fed-deq-base:bookworm WHEELHOUSE=~/.cache/fed-deq/wheelhouse bash docker/build-image.sh
#
# IMAGE (default fed-deq:latest), BASE_IMAGE, WHEELHOUSE (a folder of wheels, installed with --no-index,
# served to the build on 127.0.0.1:WHEELHOUSE_PORT, default 18765), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${IMAGE:-fed-deq:latest}
base_image=${BASE_IMAGE:-python:3.11-slim}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
python=${PYTHON:-python3}

ctx=$(mktemp -d -t fed-deq-build.XXXXXX)
server_pid=
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$ctx"
}
trap cleanup EXIT

cp "$root/docker/Dockerfile" "$root/docker/entrypoint.sh" "$root/docker/flwr-config.toml" "$ctx/"
# The project's dependencies, with torch pinned (pyproject keeps a range on purpose).
"$python" - "$root/pyproject.toml" "$torch_spec" > "$ctx/requirements.txt" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(sys.argv[2])
print("\n".join(d for d in deps if not d.replace(" ", "").startswith("torch")))
PY
mkdir "$ctx/app"
# The app as `flwr run` would bundle it: sources, scenarios, pyproject (with [tool.flwr.app]) and .gitignore.
tar -C "$root" -c --exclude='__pycache__' --exclude='*.pyc' \
  pyproject.toml fed_deq server clients scenarios $(cd "$root" && ls -d .gitignore README.md 2>/dev/null) \
  | tar -C "$ctx/app" -x

build_args=(--build-arg "BASE_IMAGE=$base_image")
# Online builds: TORCH_INDEX_URL names a CPU-only torch wheel index (else pip takes the default CUDA build).
[[ -n ${TORCH_INDEX_URL:-} ]] && build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
if [[ -n ${WHEELHOUSE:-} ]]; then
  # A fixed port: the URL is a build argument, and a new value would invalidate Docker's layer cache.
  port=${WHEELHOUSE_PORT:-18765}
  "$python" -c "import socket; socket.socket().bind(('127.0.0.1', $port))" 2>/dev/null \
    || { echo "build-image.sh: port $port is busy; set WHEELHOUSE_PORT" >&2; exit 1; }
  "$python" -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$port" >/dev/null 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do
    "$python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" 2>/dev/null && break
    sleep 0.2
  done
  build_args+=(--build-arg "WHEELHOUSE_URL=http://127.0.0.1:$port/")
fi

# --network host: the build reaches the wheelhouse server on the host's loopback.
DOCKER_BUILDKIT=0 docker build --network host -t "$image" "${build_args[@]}" "$ctx"
docker image inspect -f "{{.Size}}" "$image" | awk -v img="$image" '{printf "%s: %.0f MB\n", img, $1/1e6}'
