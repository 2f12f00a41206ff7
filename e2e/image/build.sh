#!/usr/bin/env bash
# Assembles the two container images of the Dockerfile without a container
# engine, as OCI image layouts, from the release binaries and this machine's
# Debian 12 packages (the Dockerfile's runtime is distroless cc-debian12):
#
#   OUT/kubechat/           ghcr.io/kubechat/kubechat:VERSION (gateway + push workers)
#   OUT/kubechat-operator/  ghcr.io/kubechat/kubechat-operator:VERSION
#
# each tagged VERSION (the chart's appVersion), with two layers:
#   base: what distroless cc gives these binaries: glibc's shared libraries
#         (libc6), libgcc_s (libgcc-s1), the CA bundle (ca-certificates),
#         /etc/passwd and /etc/group with `nonroot` (65532), nsswitch.conf,
#         /tmp, /home/nonroot, the packages' copyright files. No shell.
#   app:  /usr/local/bin/<the binary>, debug sections stripped
# and the config: entrypoint the binary, user 65532:65532.
#
#   e2e/image/build.sh OUT [BIN_DIR]
#
# BIN_DIR defaults to $CARGO_TARGET_DIR/release; build the binaries first with
# `cargo build --release --locked -p kubechat-gateway -p kubechat-operator`.
# e2e/tests/image.rs runs this script and checks what it made.
#
# The packages are the versions installed on this machine (the binaries were
# linked against that glibc), downloaded once into $KUBECHAT_CACHE/debs.
# umoci comes from Debian.

# shellcheck source=e2e/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/lib.sh"

(($# >= 1 && $# <= 2)) || die "usage: $0 OUT [BIN_DIR]"
OUT="$1"
BIN_DIR="${2:-${CARGO_TARGET_DIR:-$KUBECHAT_CACHE/target}/release}"

VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$REPO_ROOT/charts/kubechat/Chart.yaml")"
[[ -n "$VERSION" ]] || die "no appVersion in charts/kubechat/Chart.yaml"
NONROOT=65532
ARCH_TRIPLET=x86_64-linux-gnu
[[ "$(uname -m)" == x86_64 ]] || die "only x86_64 is supported (this is $(uname -m))"

for bin in kubechat-gateway kubechat-operator; do
  [[ -x "$BIN_DIR/$bin" ]] || die "no $BIN_DIR/$bin: run \`cargo build --release --locked -p kubechat-gateway -p kubechat-operator\` first"
done
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (this script needs a Debian host)"
command -v strip >/dev/null || apt_install binutils
command -v umoci >/dev/null || apt_install umoci

# ------------------------------------------------------------ packages ----

DEBS="$KUBECHAT_CACHE/debs"
mkdir -p "$DEBS"
# gcc-12-base only for libgcc-s1's copyright file, which lives there.
PACKAGES=(libc6 libgcc-s1 gcc-12-base ca-certificates)

deb_of() {
  local pkg="$1" version
  version="$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null)" || die "$pkg is not installed on this machine"
  local file
  file="$(find "$DEBS" -maxdepth 1 -name "${pkg}_${version//:/%3a}_*.deb" -print -quit)"
  if [[ -z "$file" ]]; then
    log "downloading $pkg $version"
    (cd "$DEBS" && apt-get download -qq "$pkg=$version" 2>/dev/null) \
      || { apt_update_once && (cd "$DEBS" && apt-get download -qq "$pkg=$version"); } \
      || die "apt-get download $pkg=$version failed"
    file="$(find "$DEBS" -maxdepth 1 -name "${pkg}_${version//:/%3a}_*.deb" -print -quit)"
    [[ -n "$file" ]] || die "apt-get download $pkg=$version wrote no .deb into $DEBS"
  fi
  printf '%s\n' "$file"
}

apt_updated=""
apt_update_once() {
  [[ -n "$apt_updated" ]] && return 0
  apt_updated=1
  local sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
}

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

for pkg in "${PACKAGES[@]}"; do
  mkdir -p "$WORK/deb/$pkg"
  dpkg-deb -x "$(deb_of "$pkg")" "$WORK/deb/$pkg"
done

# ---------------------------------------------------------------- base ----

BASE="$WORK/base"
mkdir -p "$BASE/lib/$ARCH_TRIPLET" "$BASE/lib64" "$BASE/etc/ssl/certs" "$BASE/tmp" "$BASE/home/nonroot"
chmod 1777 "$BASE/tmp"

# glibc's shared libraries (and the loader), as libc6 lays them out; no
# gconv modules, locales, docs or configuration.
cp -a "$WORK/deb/libc6/lib/$ARCH_TRIPLET/." "$BASE/lib/$ARCH_TRIPLET/"
cp -a "$WORK/deb/libc6/lib64/ld-linux-x86-64.so.2" "$BASE/lib64/"
cp -a "$WORK/deb/libgcc-s1/lib/$ARCH_TRIPLET/libgcc_s.so.1" "$BASE/lib/$ARCH_TRIPLET/"

# The CA bundle, as update-ca-certificates builds it: every certificate the
# package ships, concatenated in name order.
find "$WORK/deb/ca-certificates/usr/share/ca-certificates" -name '*.crt' -print0 | LC_ALL=C sort -z \
  | xargs -0 cat >"$BASE/etc/ssl/certs/ca-certificates.crt"
[[ -s "$BASE/etc/ssl/certs/ca-certificates.crt" ]] || die "ca-certificates shipped no certificate"

for pair in libc6:libc6 gcc-12-base:gcc-12-base ca-certificates:ca-certificates; do
  pkg="${pair%%:*}"
  mkdir -p "$BASE/usr/share/doc/$pkg"
  cp "$WORK/deb/$pkg/usr/share/doc/$pkg/copyright" "$BASE/usr/share/doc/$pkg/copyright"
done

cat >"$BASE/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:$NONROOT:$NONROOT:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$BASE/etc/group" <<EOF
root:x:0:
nonroot:x:$NONROOT:
EOF
printf 'hosts: files dns\n' >"$BASE/etc/nsswitch.conf"

# Reproducible tar: sorted, fixed times, numeric root ownership; then
# /home/nonroot appended, owned by nonroot.
repro_tar() { tar --sort=name --mtime=@0 --numeric-owner --format=posix --pax-option=delete=atime,delete=ctime "$@"; }
(cd "$BASE" && repro_tar --owner=0 --group=0 --exclude=./home/nonroot -cf "$WORK/base.tar" .)
(cd "$BASE" && repro_tar --owner="$NONROOT" --group="$NONROOT" --no-recursion -rf "$WORK/base.tar" ./home/nonroot)

# ---------------------------------------------------------------- images ----

# image NAME BINARY: one OCI layout OUT/NAME, tagged VERSION.
image() {
  local name="$1" binary="$2" layout="$OUT/$1"
  mkdir -p "$WORK/app-$name/usr/local/bin"
  # Without the debug line tables of the release profile (as the Dockerfile
  # does); symbols stay, so panics still name their functions.
  install -m 0755 "$BIN_DIR/$binary" "$WORK/app-$name/usr/local/bin/$binary"
  strip --strip-debug "$WORK/app-$name/usr/local/bin/$binary"
  (cd "$WORK/app-$name" && repro_tar --owner=0 --group=0 -cf "$WORK/app-$name.tar" .)

  rm -rf "$layout"
  umoci init --layout "$layout" >/dev/null
  umoci new --image "$layout:$VERSION"
  local created=1970-01-01T00:00:00Z  # fixed: the same inputs give the same digests
  umoci raw add-layer --image "$layout:$VERSION" --history.created "$created" \
    --history.created_by "e2e/image/build.sh: base (libc6, libgcc-s1, ca-certificates, nonroot)" "$WORK/base.tar"
  umoci raw add-layer --image "$layout:$VERSION" --history.created "$created" \
    --history.created_by "e2e/image/build.sh: /usr/local/bin/$binary" "$WORK/app-$name.tar"
  umoci config --image "$layout:$VERSION" --no-history --created "$created" \
    --os linux --architecture amd64 \
    --config.user "$NONROOT:$NONROOT" \
    --config.entrypoint "/usr/local/bin/$binary" \
    --config.workingdir / \
    --config.env "PATH=/usr/local/bin:/usr/bin:/bin" \
    --config.env "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --config.label "org.opencontainers.image.title=$name" \
    --config.label "org.opencontainers.image.version=$VERSION" \
    --config.label "org.opencontainers.image.licenses=Apache-2.0"
  umoci gc --layout "$layout"
  log "$layout:$VERSION ($(du -sk "$layout/blobs" | cut -f1) KiB of blobs)"
}

mkdir -p "$OUT"
image kubechat kubechat-gateway
image kubechat-operator kubechat-operator
