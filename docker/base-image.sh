#!/usr/bin/env bash
# Makes sure the Debian base image the Dockerfiles start FROM exists locally.
#
# Where a registry is reachable this is just `docker pull`. Where none is (a
# build farm that only reaches Debian's package mirror), the same image name is
# built from Debian's own packages: debootstrap's minimal bookworm into a
# tarball, imported under the name the Dockerfiles use, so the files build the
# same here and anywhere.
#
#   docker/base-image.sh [image]        (default: debian:bookworm-slim)
set -euo pipefail
image="${1:-debian:bookworm-slim}"
docker="${DOCKER:-docker}"

if "$docker" image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi
if timeout 60 "$docker" pull "$image" >/dev/null 2>&1; then
    echo "base image $image: pulled"
    exit 0
fi

suite="${image#*:}"
suite="${suite%-slim}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
command -v debootstrap >/dev/null || {
    echo "base image $image: no registry and no debootstrap (apt-get install debootstrap)" >&2
    exit 1
}
root="$(mktemp -d /tmp/shardline-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "base image $image: no registry reachable; building it with debootstrap ($suite from $mirror)"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    exit 1
}
rm -f "$root.log"
# What Debian's slim images leave out: package caches, docs and man pages.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
# As Debian's slim images do: no docs, man pages or translations installed by
# later packages, and apt's downloads removed after each install.
cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
DPKG
cat >"$root/etc/apt/apt.conf.d/slim" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
APT
rm -rf "$root"/usr/share/locale/*
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
SOURCES
tar -C "$root" -c . | "$docker" import --change 'CMD ["bash"]' - "$image" >/dev/null
echo "base image $image: imported"
