#!/usr/bin/env bash
# Headless Chromium and its WebDriver server for the web client's browser
# tests (gateway/tests/web_client.rs): Debian's `chromium` and
# `chromium-driver`, built from the same source, so the two always match.
# Nothing runs until a test starts them (each test starts its own
# chromedriver on a free port).
# Usage: chromium.sh install | start | status | stop
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install() {
  apt_install chromium chromium-driver
  command -v chromedriver >/dev/null || die "chromedriver is not on PATH after installing Debian's chromium-driver"
  command -v chromium >/dev/null || die "chromium is not on PATH after installing Debian's chromium"
}

status() {
  if command -v chromedriver >/dev/null && command -v chromium >/dev/null; then
    echo "chromium: installed ($(chromium --version 2>/dev/null | head -n 1))"
  else
    echo "chromium: NOT INSTALLED (run e2e/local/chromium.sh install)"
    return 1
  fi
}

case "${1:-}" in
  install | start) install ;;
  status) status ;;
  stop) ;;
  *) die "usage: $0 install | start | status | stop" ;;
esac
