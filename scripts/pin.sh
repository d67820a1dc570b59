#!/usr/bin/env bash
# Rewrites constraints.txt from .venv after the suite passed on an upgraded set (PEFTC_LATEST=1).
set -euo pipefail
cd "$(dirname "$0")/.."
head -4 constraints.txt > constraints.txt.tmp
.venv/bin/pip freeze --exclude-editable | grep -v "^torch==" >> constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
