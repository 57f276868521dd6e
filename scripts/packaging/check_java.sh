#!/usr/bin/env bash
# TorchServe's frontend is Java: require Java >= 11 and say what to install when it is missing.
set -euo pipefail
if ! command -v java >/dev/null 2>&1; then
  echo "error: Java is not installed; TorchServe needs Java 11 or newer." >&2
  echo "       Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless" >&2
  exit 1
fi
version=$(java -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
major=${version%%.*}
[ "$major" = "1" ] && major=$(echo "$version" | cut -d. -f2)
if [ "${major:-0}" -lt 11 ]; then
  echo "error: Java $version found; TorchServe needs Java 11 or newer (apt-get install openjdk-17-jre-headless)." >&2
  exit 1
fi
echo "Java $version: ok"
