#!/bin/sh
# Entrypoint of Dockerfile.cpu: make sure the embedded default models are prepared in $ALIGND_HOME (a no-op
# when the image was built with them), then run the gateway with the container's arguments.
set -e
alignd models prepare --quiet
exec alignd serve "$@"
