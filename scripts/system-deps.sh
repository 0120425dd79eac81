#!/usr/bin/env bash
# System programs some tests use, from Debian's packages: OpenSSH (a real sshd on 127.0.0.1 for the
# devices tests), Chromium + ChromeDriver (the report.html browser test), and qemu-user + mmdebstrap (ARM
# targets' artifacts verified in aarch64 runtimes under emulation: edgekit/emulate). Installs what is missing
# when run as root with apt-get; otherwise says what to install and exits 1.
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "system-deps: missing ${need[*]}; install them (Debian: sudo apt-get install ${need[*]}) or the tests that need them skip" >&2
  exit 1
fi
