#!/usr/bin/env bash
# Install the test dependencies (scripts/install-test-deps.sh) and run the
# whole test suite with the project's virtualenv. Extra arguments go to pytest:
#   ./scripts/test.sh                 # everything (what CI runs)
#   ./scripts/test.sh -k harness -x   # a subset
# With CI set in the environment, tests needing a missing QEMU tool fail
# instead of skipping.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

./scripts/install-test-deps.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
