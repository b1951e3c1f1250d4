#!/usr/bin/env bash
# Quick start: installs what cairn needs, builds `repo`, and runs the main job on the
# embedded default: a local, encrypted repository under your data directory
# (~/.local/share/cairn/repository), its password in ~/.config/cairn/password (0600),
# both named in ~/.config/cairn/config so plain `repo ...` commands find them.
# It backs up PATHS (default: this source tree), backs it up again (nothing new is
# stored), lists the snapshots, restores the latest one and checks it against the source.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/install-deps.sh"
cargo build --release --manifest-path "$here/Cargo.toml" -q
repo="$here/target/release/repo"

config_dir="${XDG_CONFIG_HOME:-$HOME/.config}/cairn"
data_dir="${XDG_DATA_HOME:-$HOME/.local/share}/cairn"
mkdir -p "$config_dir" "$data_dir"
chmod 700 "$config_dir"
if [ ! -f "$config_dir/config" ]; then
  [ -f "$config_dir/password" ] || (umask 077; head -c 32 /dev/urandom | base64 > "$config_dir/password")
  printf 'repository = %s\npassword_file = %s\n' "$data_dir/repository" "$config_dir/password" > "$config_dir/config"
  echo "wrote $config_dir/config (repository and password file)"
fi
if ! "$repo" snapshots -q >/dev/null 2>&1; then
  "$repo" init
fi

paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=("$here")
echo "== backup ${paths[*]}"
"$repo" backup --exclude target --exclude .git "${paths[@]}"
echo "== the same again: unchanged files are not read, nothing new is stored"
"$repo" backup --exclude target --exclude .git "${paths[@]}"
echo "== snapshots"
"$repo" snapshots
restore_dir="$(mktemp -d)"
trap 'rm -rf "$restore_dir"' EXIT
echo "== restore latest into $restore_dir"
"$repo" restore latest --target "$restore_dir"
for p in "${paths[@]}"; do
  abs="$(cd "$p" && pwd)"
  diff -r --exclude target --exclude .git "$abs" "$restore_dir$abs" >/dev/null
  echo "restored $abs matches the source"
done
echo "== done: try '$repo snapshots', '$repo ls latest', '$repo --help'"
