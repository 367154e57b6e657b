#!/usr/bin/env bash
# The full check: bootstrap, ruff lint, ruff format, unasync (if present), mypy,
# the import layering (import-linter), pytest.
# Every step runs; the exit status is non-zero if any failed. Arguments go to pytest.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

header() { printf '\n==> %s\n' "$*"; }

header "bootstrap"
if ! bash scripts/bootstrap.sh; then
    echo "test: bootstrap failed; nothing else was run" >&2
    exit 1
fi

paths=()
for path in tieredcache cdc tests benchmarks examples scripts; do
    [ -e "$path" ] && paths+=("$path")
done

failed=()
step() {
    local name=$1
    shift
    header "$name"
    "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        # pytest exits 5 when it collected no tests: that is a failure too.
        [ "$name" = pytest ] && [ "$rc" -eq 5 ] && echo "test: pytest collected no tests" >&2
        echo "test: $name failed (exit $rc)" >&2
        failed+=("$name")
    fi
}

step "ruff check" .venv/bin/ruff check "${paths[@]}"
step "ruff format --check" .venv/bin/ruff format --check "${paths[@]}"
if [ -f scripts/unasync.py ]; then
    step "unasync --check" .venv/bin/python scripts/unasync.py --check
fi
step "mypy" .venv/bin/mypy
step "import layering (lint-imports)" .venv/bin/lint-imports
step "pytest" .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

echo
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'test: FAILED steps: %s\n' "${failed[*]}" >&2
    exit 1
fi
echo "test: all steps passed"
