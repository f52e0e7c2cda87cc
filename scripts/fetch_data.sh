#!/usr/bin/env bash
# Fetches the Debian packages that hold the offline data sets used by moerge.datasets.
#
# Each package is downloaded with `apt-get download` (no installation, nothing system-wide) and
# unpacked with `dpkg-deb -x` into data/debian/<package>/ under the repository root, or under
# $MOERGE_DATASETS_DIR/debian/<package>/ when MOERGE_DATASETS_DIR is set. Packages already unpacked are
# left alone, so running the script again does nothing and needs no network.
set -euo pipefail

PACKAGES=(r-cran-modeldata wordnet-base fortunes)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data_dir="${MOERGE_DATASETS_DIR:-$repo_root/data}"
debian_dir="$data_dir/debian"

missing=()
for package in "${PACKAGES[@]}"; do
    if [[ -f "$debian_dir/$package/.complete" ]]; then
        echo "present: $package ($debian_dir/$package)"
    else
        missing+=("$package")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "nothing to do: all ${#PACKAGES[@]} packages are in $debian_dir"
    exit 0
fi

for tool in apt-get dpkg-deb; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: $tool not found; this script needs a Debian-based system" >&2
        exit 1
    fi
done

download_dir="$(mktemp -d)"
trap 'rm -rf "$download_dir"' EXIT

cd "$download_dir"
if ! apt-get download "${missing[@]}" >/dev/null 2>&1; then
    echo "package lists lack ${missing[*]}; running apt-get update (needs root)"
    apt-get update -qq
    apt-get download "${missing[@]}"
fi

mkdir -p "$debian_dir"
for package in "${missing[@]}"; do
    deb_files=("$download_dir/${package}"_*.deb)
    target="$debian_dir/$package"
    rm -rf "$target"
    mkdir -p "$target"
    dpkg-deb -x "${deb_files[0]}" "$target"
    basename "${deb_files[0]}" >"$target/.complete"
    echo "fetched: $package -> $target ($(basename "${deb_files[0]}"))"
done
