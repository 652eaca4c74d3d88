#!/usr/bin/env bash
# Install headless Chromium + chromedriver for the web page tests, only when missing.
# Idempotent and quiet; never fails CI: without apt (or root) the browser tests skip.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: apt-get not available; browser tests will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "ensure-chromium: not root and no sudo; browser tests will be skipped" >&2
    exit 0
  fi
fi
if ! { $SUDO apt-get update -qq && \
       DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; \
     } >/tmp/ensure-chromium.log 2>&1; then
  echo "ensure-chromium: install failed (see /tmp/ensure-chromium.log); browser tests" \
       "will be skipped" >&2
fi
exit 0
