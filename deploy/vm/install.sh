#!/usr/bin/env bash
# Installs one flotilla role on this machine: the `flotilla` user, /etc/flotilla (config and
# a tls/ directory for certificates), the binary, the example config (kept if one exists)
# and the systemd unit. Then edit the config and `systemctl enable --now flotilla-ROLE`.
#
# Usage: sudo deploy/vm/install.sh server|agent|gateway [BINARY]   (default ./target/release/flotilla)
# ROOT=DIR installs under DIR instead of / and skips useradd and systemctl (for tests).
set -euo pipefail
role=${1:-}
case $role in
  server | agent | gateway) ;;
  *) echo "usage: $0 server|agent|gateway [BINARY]" >&2; exit 2 ;;
esac
bin=${2:-./target/release/flotilla}
[[ -x $bin ]] || { echo "error: $bin is not an executable flotilla binary (build with cargo build --release)" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=${ROOT:-}
owner=(-o root -g flotilla)
if [[ -z $root ]]; then
  id -u flotilla >/dev/null 2>&1 || useradd --system --home-dir /var/lib/flotilla --shell /usr/sbin/nologin flotilla
  # GPU device nodes are group `video` on most distributions.
  if [[ $role == agent ]] && getent group video >/dev/null; then usermod -aG video flotilla; fi
else
  owner=()
fi
install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/local/share/doc/flotilla"
install -m 0755 "$bin" "$root/usr/local/bin/flotilla"
install -d -m 0750 "${owner[@]}" "$root/etc/flotilla" "$root/etc/flotilla/tls"
if [[ ! -e $root/etc/flotilla/$role.toml ]]; then
  install -m 0640 "${owner[@]}" "$here/config/$role.toml" "$root/etc/flotilla/$role.toml"
fi
install -m 0644 "$here/systemd/flotilla-$role.service" "$root/etc/systemd/system/flotilla-$role.service"
install -m 0644 "$here/../docs/deploy.md" "$root/usr/local/share/doc/flotilla/deploy.md"
"$root/usr/local/bin/flotilla" "$role" --config "$root/etc/flotilla/$role.toml" --help >/dev/null
if [[ -z $root ]]; then systemctl daemon-reload; fi
echo "installed flotilla $role: edit /etc/flotilla/$role.toml, put certificates in /etc/flotilla/tls, then: systemctl enable --now flotilla-$role"
