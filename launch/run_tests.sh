#!/usr/bin/env bash
# The test command: set up .venv if needed, lint (ruff, configured in pyproject.toml), then run the default test
# suite (pytest args pass through).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
python -m ruff check --quiet .
exec python -m pytest "$@"
