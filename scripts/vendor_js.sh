#!/usr/bin/env bash
# Fetch the book's vendored JavaScript from npm at pinned versions, check the tarballs
# against npm's published integrity hashes, copy the files the book serves into
# book/_static/, and check them against book/_static/SHA256SUMS (the committed audit list).
#
#   scripts/vendor_js.sh            # refresh, then verify
#   scripts/vendor_js.sh --verify   # only verify the committed files (no network)
#
# To move to another version: change the pins below, run the script, review the diff, then
# regenerate SHA256SUMS with `scripts/vendor_js.sh --write-sums` and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
STATIC="$(pwd)/book/_static"

HTML_MANAGER=@jupyter-widgets/html-manager@1.0.15   # the renderer of saved ipywidgets 8 state
HTML_MANAGER_SHA512=5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==
MATHJAX=mathjax@3.2.2
MATHJAX_SHA512=Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==

vendored_files() {
  (cd "$STATIC" && find jupyter-widgets mathjax -type f | LC_ALL=C sort)
}

verify() {
  (cd "$STATIC" && sha256sum --quiet -c SHA256SUMS)
  local listed actual
  listed=$(cut -c67- "$STATIC/SHA256SUMS" | LC_ALL=C sort)
  actual=$(vendored_files)
  if [ "$listed" != "$actual" ]; then
    echo "ERROR: files under $STATIC differ from the list in SHA256SUMS:" >&2
    diff <(echo "$listed") <(echo "$actual") >&2 || true
    exit 1
  fi
  echo ">> vendored JavaScript matches $STATIC/SHA256SUMS ($(echo "$actual" | wc -l) files)"
}

case "${1:-}" in
  --verify) verify; exit 0 ;;
  --write-sums) (cd "$STATIC" && vendored_files | xargs sha256sum > SHA256SUMS); verify; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--verify | --write-sums]" >&2; exit 2 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fetch() {  # fetch <package@version> <sha512 base64>
  local tgz
  tgz=$(cd "$work" && npm pack --silent "$1")
  local got
  got=$(openssl dgst -sha512 -binary "$work/$tgz" | base64 -w0)
  if [ "$got" != "$2" ]; then
    echo "ERROR: $1: tarball sha512 $got does not match the pinned $2" >&2
    exit 1
  fi
  mkdir -p "$work/${tgz%.tgz}" && tar xzf "$work/$tgz" -C "$work/${tgz%.tgz}"
  echo "$work/${tgz%.tgz}/package"
}

hm=$(fetch "$HTML_MANAGER" "$HTML_MANAGER_SHA512")
mkdir -p "$STATIC/jupyter-widgets"
cp "$hm"/dist/embed.js "$hm"/dist/embed.js.LICENSE.txt "$hm"/dist/*.woff2 "$STATIC/jupyter-widgets/"

mj=$(fetch "$MATHJAX" "$MATHJAX_SHA512")
mkdir -p "$STATIC/mathjax/output/chtml/fonts" "$STATIC/mathjax/input/tex"
cp "$mj"/es5/tex-mml-chtml.js "$mj"/LICENSE "$STATIC/mathjax/"
cp -r "$mj"/es5/output/chtml/fonts/woff-v2 "$STATIC/mathjax/output/chtml/fonts/"
cp -r "$mj"/es5/input/tex/extensions "$STATIC/mathjax/input/tex/"

verify
