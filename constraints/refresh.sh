#!/usr/bin/env bash
# Refreshes constraints/main.txt and constraints/lmms.txt (`make lock` runs this) from pyproject.toml's
# requirements: `make setup` with no constraints (CONSTRAINTS=) in a fresh temporary venv installs the newest
# versions pyproject.toml allows (the torch and torchvision pins first, `.[dev]`, DeepSpeed), whose
# `pip freeze` becomes main.txt; then `.[lmms]` goes on top in the same venv, as `make test-lmms` does, and a
# second freeze becomes lmms.txt (the main set plus what the extra adds or moves, e.g. filelock<4). Nothing in
# .venv changes. Afterwards: `make test` and `make test-lmms`, then commit the two files if both pass. Takes
# several minutes (downloads; DeepSpeed is built from source).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_pin=${TORCH_PIN:-$(sed -n 's/^TORCH_PIN := //p' Makefile)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
venv=$tmp/venv

# freeze OUT TITLE...: the venv's `pip freeze` (moevl itself excluded) under a header; a local build label
# (torch==2.13.0+cpu) is dropped so that the pin also matches PyPI's build.
freeze() {
  local out=$1
  shift
  {
    printf '# %s\n' "$@"
    printf '# Refresh both files: `make lock` (constraints/refresh.sh), then `make test` and `make test-lmms`.\n'
    printf '# Resolved %s with %s on %s %s.\n' "$(date -u +%Y-%m-%d)" \
      "$("$venv/bin/python" -c 'import platform; print("Python", platform.python_version())')" \
      "$(uname -s)" "$(uname -m)"
    "$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^([^ =]+==[^+ ]+)\+[^ ]+$/\1/'
  } >"$out"
  if grep -q ' @ ' "$out"; then
    echo "refresh.sh: a direct reference (name @ url) in $out cannot be a constraint" >&2
    exit 1
  fi
}

make --no-print-directory setup VENV="$venv" CONSTRAINTS= TORCH_PIN="$torch_pin"
freeze "$tmp/main.txt" \
  'Constraints of `make setup` (pip install -c constraints/main.txt): the versions of the main install' \
  '(`.[dev]` and DeepSpeed) tested together by `make test`.'

# $torch_pin unquoted: two requirements (torch==... torchvision==...)
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q -e ".[lmms]" $torch_pin
freeze "$tmp/lmms.txt" \
  'Constraints of `make test-lmms` and `make check-lmms-lock` (pip install -c constraints/lmms.txt): main.txt' \
  'plus what the `lmms` extra adds or moves (`diff` the two files), tested together by `make test-lmms`.'

mv "$tmp/main.txt" constraints/main.txt
mv "$tmp/lmms.txt" constraints/lmms.txt
git --no-pager diff --stat -- constraints/ || true
