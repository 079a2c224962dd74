#!/usr/bin/env bash
# Install Debian packages with apt-get where that is usable here (root, or passwordless sudo);
# used by the Makefile's `data` and `browser` targets. Retries once after `apt-get update`.
# Exit status: 0 installed, 1 apt-get failed, 2 apt-get not usable here (says why in one line).
#   scripts/apt_install.sh [apt-get install options] PACKAGE...
set -u
if ! command -v apt-get >/dev/null 2>&1; then
  echo ">> apt-get not available here"; exit 2
fi
if [ "$(id -u)" = 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo="sudo -n"
else
  echo ">> apt-get not usable here (not root, no passwordless sudo)"; exit 2
fi
install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"; }
echo ">> apt-get install $*"
install "$@" || { $sudo apt-get update && install "$@"; } || exit 1
