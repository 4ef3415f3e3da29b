#!/usr/bin/env bash
# Mutation testing of the core modules (not part of CI); results and survivors: tests/MUTATION.md.
#
#   tests/mutation/run.sh [MODULE ...]     MODULE: metrics pairs objective state_dicts atomic_files plots
#                                                  resend featurenorm optim engine
#                                                  distance probe classifier maps density latent
#                                          (default: all sixteen, one after the other)
#
# The configuration is the [mutmut] section of setup.cfg (which files are mutated, which test files
# run). The working tree is copied to $MUTATION_WORKDIR (default /tmp/resend-mutation) and mutmut
# runs there, so the repository gets no mutants/ folder and edits made during a run do not leak
# into it. mutmut runs, for each mutant, only the tests that executed the mutated function.
# One worker ($MUTATION_CHILDREN, default 1): on the development machine (2 cores) the six round-1
# modules take 6-8 min of wall time and about 5.5 min of CPU, the four round-2 modules (resend ...
# engine) 2-3 min and about 2.3 min of CPU, the six round-3 scorer modules (distance ... latent) about 7 min
# and 7 min of CPU. Needs mutmut 3.8 (`pip install 'mutmut==3.8.*'`; it
# is not in requirements-dev.txt: mutation testing is not part of CI). mutmut leaves decorated
# functions and code outside functions alone: tests/mutation/hand_mutants.py covers those of the
# round-2 and round-3 modules.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${MUTATION_WORKDIR:-/tmp/resend-mutation}
children=${MUTATION_CHILDREN:-1}
python=${PYTHON:-python}

declare -A module_of=(
  [metrics]=evaluation.metrics [pairs]=datasets.pairs [objective]=models.objective
  [state_dicts]=models.state_dicts [atomic_files]=utils.atomic_files [plots]=evaluation.plots
  [resend]=evaluation.scorers.resend [featurenorm]=evaluation.scorers.featurenorm [optim]=utils.optim
  [engine]=training.engine
  [distance]=evaluation.scorers.distance [probe]=evaluation.scorers.probe
  [classifier]=evaluation.scorers.classifier [maps]=evaluation.scorers.maps
  [density]=evaluation.scorers.density [latent]=evaluation.scorers.latent
)
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=(metrics pairs objective state_dicts atomic_files plots
                                     resend featurenorm optim engine
                                     distance probe classifier maps density latent)
"$python" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed for $python: pip install 'mutmut==3.8.*'" >&2; exit 2; }
for name in "${modules[@]}"; do
  [ -n "${module_of[$name]:-}" ] || { echo "unknown module '$name'; valid: ${!module_of[*]}" >&2; exit 2; }
done

# A fresh copy of the tracked and untracked (not ignored) files each time: mutmut keeps its own
# copies of unmutated files in mutants/ and would not see later edits to them.
if [ -e "$work" ]; then
  [ -f "$work/.resend-mutation" ] || { echo "$work exists and is not a mutation work folder" >&2; exit 2; }
  rm -rf "$work"
fi
mkdir -p "$work" && touch "$work/.resend-mutation"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
   | "$python" -c 'import os, sys; sys.stdout.buffer.write(b"".join(
         p + b"\0" for p in sys.stdin.buffer.read().split(b"\0") if p and os.path.isfile(p)))' \
   | tar --null -T - -cf -) | (cd "$work" && tar -xf -)

cd "$work"
for name in "${modules[@]}"; do
  echo "=== $name (${module_of[$name]})"
  "$python" -m mutmut run --max-children "$children" "${module_of[$name]}.*" | tail -n 3
done
"$python" "$repo/tests/mutation/summary.py" "${modules[@]}"
