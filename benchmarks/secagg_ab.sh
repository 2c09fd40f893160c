#!/usr/bin/env bash
# Side-by-side speed of two revisions: `benchmarks/secagg_ab.sh OLD_REV [ROUNDS]` builds OLD_REV in a temporary
# git worktree (its own compiled kernel) and runs benchmarks/secagg.py there and in this checkout alternately,
# ROUNDS times each (default 3), printing one line per run: revision, plaintext and masking CPU seconds
# (medians of 9 rounds) and their ratio. Alternating is what makes the figures comparable on a noisy VM.
set -euo pipefail
cd "$(dirname "$0")/.."
old="${1:?usage: benchmarks/secagg_ab.sh OLD_REV [ROUNDS]}"
rounds="${2:-3}"
PY="$(pwd)/.venv/bin/python"
tree="$(mktemp -d)/old"
git worktree add -q --detach "$tree" "$old"
trap 'git worktree remove --force "$tree"' EXIT
(cd "$tree" && "$PY" setup.py build_ext --inplace >/dev/null 2>&1)
for _ in $(seq "$rounds"); do
  for side in old new; do
    dir="$(pwd)"; [ "$side" = old ] && dir="$tree"
    (cd "$dir" && OMP_NUM_THREADS=1 "$PY" benchmarks/secagg.py --no-flower --no-crypten --json 2>/dev/null | tail -1 |
      "$PY" -c "import json, sys; d = json.load(sys.stdin); print('$side', d['plaintext_cpu_s'], d['masking_cpu_s'],
d['ratio_vs_plaintext_cpu'], flush=True)")
  done
done
