#!/bin/sh
# Give each container a private, writable FLWR_HOME holding the `flwr` CLI connections, then run the command.
set -e
mkdir -p "$FLWR_HOME"
[ -f "$FLWR_HOME/config.toml" ] || cp /etc/fed-deq/flwr-config.toml "$FLWR_HOME/config.toml"
exec "$@"
