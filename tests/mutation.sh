#!/usr/bin/env bash
# Mutation testing of the pure modules (TESTING.md): mutmut, configured in pyproject.toml's
# [tool.mutmut], one module at a time, each run timed; then the count of each outcome per module.
#   bash tests/mutation.sh                 every module below
#   bash tests/mutation.sh labels outputs  only these (names of the MODULES table)
#   bash tests/mutation.sh --summary       only the table of the last results
#   bash tests/mutation.sh --survivors     the survivors and timeouts again (after new tests)
#   bash tests/mutation.sh --sample        a tenth of every module's mutants, in one run (the
#                                          quick check, ~14 minutes here; SAMPLE_DIGITS=37 a fifth)
# Results stay in mutants/ (ignored by git): `mutmut results`, `mutmut show NAME`.
set -uo pipefail
set -f  # the module patterns below are mutmut's globs, not file names
cd "$(dirname "$0")/.."
MUTMUT=${MUTMUT:-mutmut}
# JAX's persistent compilation cache, shared by every mutant's child: a mutant changes one
# function, so the other functions its tests compile are read back instead of compiled again
# (tests/losses/test_losses.py: 36 s -> 9.5 s in a fresh process once the cache is warm).
# A mutated function traces to other HLO, so it gets its own key and is compiled afresh.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/mutants/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
declare -A MODULES=(
  [losses]="brats_jax.losses.core.* brats_jax.losses.class_balanced.* brats_jax.losses.regions.* brats_jax.losses.deep_supervision.* brats_jax.losses.registry.*"
  [slices]="brats_jax.metrics.slices.*"
  [volumes]="brats_jax.metrics.volumes.*"
  [lesionwise]="brats_jax.metrics.lesionwise.*"
  [outputs]="brats_jax.models.outputs.*"
  [labels]="brats_jax.labels.*"
  [postprocess]="brats_jax.inference.postprocess.* brats_jax.inference.postprocess_choice.*"
  [augment]="brats_jax.data.augment.*"
  [ensembles]="brats_jax.inference.ensembles.*"
  [uncertainty]="brats_jax.inference.uncertainty.*"
  [splits]="brats_jax.data.folds.* brats_jax.data.pipeline.x_prune_keep_* brats_jax.data.pipeline.x__parse_ids_* brats_jax.data.pipeline.x__n_for_* brats_jax.data.pipeline.x__split_case_ids_* brats_jax.data.pipeline.x__first_train_cases_* brats_jax.data.pipeline.x_build_splits_*"
)
ORDER=(splits labels outputs uncertainty postprocess lesionwise volumes ensembles slices losses augment)

summary() {
  local lines
  lines=$(for m in "${ORDER[@]}"; do echo "$m=${MODULES[$m]}"; done)
  "$MUTMUT" results --all true 2>/dev/null | MODULE_LINES="$lines" python3 -c '
import fnmatch, os, sys
modules = dict(line.split("=", 1) for line in os.environ["MODULE_LINES"].splitlines())
rows = {m: {} for m in modules}
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    for m, globs in modules.items():
        if any(fnmatch.fnmatch(name, g) for g in globs.split()):
            rows[m][status] = rows[m].get(status, 0) + 1
fmt = "%-12s %6s %7s %9s %8s %6s"
print(fmt % ("module", "total", "killed", "survived", "timeout", "other"))
for m, c in rows.items():
    t = sum(c.values())
    if t:
        k, s, o = c.get("killed", 0), c.get("survived", 0), c.get("timeout", 0)
        print(fmt % (m, t, k, s, o, t - k - s - o))
'
}

if [ "${1:-}" = "--summary" ]; then summary; exit 0; fi
if [ "${1:-}" = "--survivors" ]; then  # after adding tests: run the survivors and timeouts again
  names=$("$MUTMUT" results 2>/dev/null | awk -F': ' '$2 == "survived" || $2 == "timeout" {print $1}')
  start=$(date +%s)
  # shellcheck disable=SC2086
  nice -n 10 "$MUTMUT" run $names > mutants/run-survivors.log 2>&1
  echo "survivors: $(( $(date +%s) - start )) s (log: mutants/run-survivors.log)"
  summary
  exit 0
fi
if [ "${1:-}" = "--sample" ]; then
  # the mutants whose number ends in one of SAMPLE_DIGITS (default 3: _3, _13, _23, ...), a
  # fixed ~10 % of each function with 3 or more mutants, all modules in one mutmut run
  digits=${SAMPLE_DIGITS:-3}
  patterns=()
  for m in "${ORDER[@]}"; do
    for g in ${MODULES[$m]}; do  # "a.b.*" -> "a.b.*__mutmut_*3", "a.x_f_*" -> "a.x_f*__mutmut_*3"
      g=${g%\*}
      patterns+=("${g%_}*__mutmut_*[$digits]")
    done
  done
  mkdir -p mutants
  start=$(date +%s)
  nice -n 10 "$MUTMUT" run "${patterns[@]}" > mutants/run-sample.log 2>&1
  echo "sample (digits $digits): $(( $(date +%s) - start )) s (log: mutants/run-sample.log)"
  summary
  exit 0
fi
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${ORDER[@]}")
for m in "${selected[@]}"; do
  [ -n "${MODULES[$m]:-}" ] || { echo "unknown module $m; expected one of ${ORDER[*]}" >&2; exit 2; }
  start=$(date +%s)
  # shellcheck disable=SC2086
  mkdir -p mutants
  nice -n 10 "$MUTMUT" run ${MODULES[$m]} > "mutants/run-$m.log" 2>&1
  echo "$m: $(( $(date +%s) - start )) s (log: mutants/run-$m.log)"
done
summary
