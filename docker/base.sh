#!/usr/bin/env bash
# Makes sure the base image, debian:bookworm-slim, is in the local Docker engine: kept when
# present, pulled when a registry answers, and otherwise built from Debian's packages
# (debootstrap's minbase variant, slimmed as the official image is: no docs, man pages,
# locales or apt lists, and dpkg told not to bring them back), then imported under that tag.
# The images' binaries are built on the host, so the base must carry the host's glibc
# (bookworm's 2.36) or an older one.
set -euo pipefail

TAG=${KILN_BASE_IMAGE:-debian:bookworm-slim}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$TAG" >/dev/null 2>&1; then
    exit 0
fi
if timeout 60 docker pull --quiet "$TAG" >/dev/null 2>&1; then
    echo "base: pulled $TAG" >&2
    exit 0
fi
echo "base: $TAG cannot be pulled; building it from Debian's packages with debootstrap" >&2

sudo=""
if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || { echo "base: debootstrap needs root (or sudo without a password)" >&2; exit 1; }
    sudo="sudo -n"
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
        || { echo "base: please install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/kiln-base.XXXXXX")
trap '$sudo rm -rf "$root"' EXIT
$sudo debootstrap --variant=minbase --arch=amd64 bookworm "$root" "$MIRROR" >/dev/null

# What the official slim image leaves out, and the dpkg rules that keep it out.
$sudo tee "$root/etc/dpkg/dpkg.cfg.d/docker" >/dev/null <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
$sudo tee "$root/etc/apt/apt.conf.d/docker-clean" >/dev/null <<'CFG'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
CFG
$sudo find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
$sudo find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
$sudo rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log "$root"/tmp/*
$sudo find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
echo "deb $MIRROR bookworm main" | $sudo tee "$root/etc/apt/sources.list" >/dev/null

$sudo tar -C "$root" --numeric-owner -c . \
    | docker import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$TAG" >/dev/null
echo "base: built $TAG ($(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
