#!/usr/bin/env bash
# Builds the project's images: shardline:<tag> and shardline-postgres:<tag>.
#
#   docker/build.sh [--host-binary | --binary PATH] [--tag TAG]
#
# --host-binary  build Shardline with the host's cargo (`cargo build
#                --release`: incremental, and no Rust image needed) and copy
#                the stripped binary into the image's runtime stage; without
#                it the Dockerfile's build stage compiles it in the Rust image.
# --binary PATH  use a binary already built on the host (the container tests
#                use the debug binary the process tests build).
# The Debian base image is pulled, or built locally with debootstrap when no
# registry is reachable (docker/base-image.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

host_binary=0
binary=
tag=dev
while [ $# -gt 0 ]; do
    case "$1" in
    --host-binary) host_binary=1 ;;
    --binary) binary="$2"; shift ;;
    --tag) tag="$2"; shift ;;
    *) echo "usage: docker/build.sh [--host-binary | --binary PATH] [--tag TAG]" >&2; exit 2 ;;
    esac
    shift
done

# BuildKit builds only the stages an image needs (the runtime stage does not
# need the Rust image when the binary comes from the host). Current Docker
# CLIs use it through the buildx plugin; Debian's docker.io CLI through
# DOCKER_BUILDKIT=1. Pick a CLI that has one of the two.
docker_cli() {
    if docker buildx version >/dev/null 2>&1; then
        echo docker
    elif [ -x /usr/bin/docker ]; then
        echo /usr/bin/docker
    else
        echo docker
    fi
}
DOCKER="${DOCKER:-$(docker_cli)}"
export DOCKER DOCKER_BUILDKIT=1

docker/base-image.sh debian:bookworm-slim

start=$SECONDS
"$DOCKER" build -q -t "shardline-postgres:$tag" docker/postgres >/dev/null
echo "image shardline-postgres:$tag built ($((SECONDS - start)) s)"

start=$SECONDS
args=()
if [ "$host_binary" = 1 ]; then
    cargo build --release --locked --bin shardline
    binary=target/release/shardline
fi
if [ -n "$binary" ]; then
    mkdir -p target/docker
    strip -o target/docker/shardline.tmp "$binary"
    mv target/docker/shardline.tmp target/docker/shardline
    args+=(--build-arg BINARY_FROM=host)
fi
"$DOCKER" build -q "${args[@]}" -f docker/Dockerfile -t "shardline:$tag" . >/dev/null
echo "image shardline:$tag built ($((SECONDS - start)) s)"
