#!/usr/bin/env bash
# Builds the Debian package with Debian's own tooling (debhelper, dh-python, pybuild; the
# recipe is debian/) into dist/corecap_<version>_all.deb, then runs lintian on it: an error or
# a warning fails the build (debian/corecap.lintian-overrides says why each override is there).
# Installs its build dependencies (debian/control's Build-Depends, and lintian) with apt-get
# when they are missing. Needs root for that only.
#
#   scripts/build-deb.sh [--outdir DIR]   # default dist/; prints the package's path last
#   scripts/build-deb.sh --list-sources   # the files the package is built from (what the
#                                         # build copies; tests/test_deb.py hashes them)
#
# The build runs in a copy of the checkout's files (tracked and untracked, not ignored) in a
# temporary directory: the checkout gets nothing but the package in DIR. Exit 77: this
# machine cannot build it (no apt-get to install what is missing; the reason is the last line).
set -euo pipefail
cd "$(dirname "$0")/.."

list_sources() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do if [[ -f $f ]]; then printf '%s\n' "$f"; fi; done
  else  # not a git checkout (a tarball): every file but what .gitignore names
    find . \( -name .git -o -name .venv -o -name dist -o -name build -o -name __pycache__ \
      -o -name '*.egg-info' -o -name '.*_cache' -o -name .hypothesis \) -prune \
      -o -type f -printf '%P\n'
  fi | LC_ALL=C sort
}

outdir=dist
case ${1:-} in
  --list-sources) list_sources; exit 0 ;;
  --outdir) outdir=${2:?--outdir needs a directory} ;;
  '') ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac

log() { echo "build-deb: $*" >&2; }
# Debian's tools with Debian's python3: not a pyenv, venv or /usr/local one found first
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
cannot() { echo "build-deb: cannot build the package here: $*" >&2; exit 77; }

# The version is pyproject.toml's; debian/changelog must say the same (add an entry with
# `dch -v VERSION` when the version changes).
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
changelog=$(sed -n '1s/^corecap (\([^)]*\)).*/\1/p' debian/changelog)
if [[ $changelog != "$version" ]]; then
  log "debian/changelog is at $changelog, pyproject.toml at $version: add a changelog entry"
  exit 1
fi

if ! command -v dpkg-checkbuilddeps >/dev/null || ! dpkg-checkbuilddeps 2>/dev/null ||
    ! command -v lintian >/dev/null; then
  command -v apt-get >/dev/null || cannot "no apt-get to install the build dependencies"
  [[ $(id -u) == 0 ]] || cannot "installing the build dependencies needs root"
  log "apt-get build-dep ./ (debian/control's Build-Depends) and lintian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq -o DPkg::Lock::Timeout=300 ./ >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=300 lintian >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/corecap-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/corecap-$version"
list_sources | tar -cf - -T - | tar -xf - -C "$work/corecap-$version"

log "dpkg-buildpackage (debhelper, dh-python, pybuild) in $work"
(cd "$work/corecap-$version" && dpkg-buildpackage -b -us -uc) >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  log "dpkg-buildpackage failed"
  exit 1
}
deb=corecap_${version}_all.deb

# lintian as an unprivileged user: it need not be root, and says so when it is
chmod 755 "$work"
chmod 644 "$work/$deb"
as_user=()
[[ $(id -u) == 0 ]] && as_user=(setpriv --reuid=nobody --regid=nogroup --clear-groups --)
log "lintian $deb"
if ! (cd / && "${as_user[@]}" lintian --fail-on error,warning --display-info "$work/$deb") >&2; then
  log "lintian found errors or warnings (above)"
  exit 1
fi

mkdir -p "$outdir"
cp "$work/$deb" "$outdir/$deb.tmp"
mv "$outdir/$deb.tmp" "$outdir/$deb"
echo "$outdir/$deb"
