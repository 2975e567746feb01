#!/usr/bin/env bash
# A page `fpo features --html` wrote, rendered by a real headless browser to a PNG: what the docs' picture of the
# page is made with. Needs Chromium (Debian: apt-get install chromium).
#   bash scripts/screenshot_page.sh runs/demo/features.html docs/img/features_page.png [width] [height]
set -euo pipefail
page=${1:?the page (an .html file)}
out=${2:?the PNG to write}
width=${3:-1280}
height=${4:-1600}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no Chromium found: apt-get install chromium" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$width,$height" \
  --screenshot="$(realpath -m "$out")" "file://$(realpath "$page")" 2>/dev/null
echo "$out"
