#!/usr/bin/env bash
# The ledger's expensive entries on an accelerator machine (`mesacli reproduce run` there, the records back here).
#
#   scripts/device_ledger.sh BUDGET [ID ...]      e.g. scripts/device_ledger.sh 8m fig7b-partial-softmax7-t50
#
# Runs from the repository root of a checkout whose results/ holds the committed record, with jax, optax,
# orbax-checkpoint, typer, rich, pyyaml and matplotlib installed (no install step: the machine may be offline).
# Trains / resumes and analyses the entries (default: all, by priority) for BUDGET, one spec at a time, then
# copies every results/<spec>/ it changed to $OUT/results/ (when OUT is set), ready to be copied over this
# checkout's results/ and committed.  Each training session adds its device to results/<spec>/sessions.jsonl,
# so the record says which steps ran where.  RESULTS=dir: another results folder; PYTHON: the interpreter.
set -uo pipefail
budget=${1:?usage: scripts/device_ledger.sh BUDGET [ID ...]}
shift
results=${RESULTS:-results}
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import jax; print('devices:', jax.devices())" || exit 1
stamp=$(mktemp)
"$python" -m mesacli.cli reproduce run "$@" --results "$results" --budget "$budget" --jobs 1 --no-progress
rc=$?
changed=$(find "$results" -mindepth 2 -newer "$stamp" -type f -printf "%P\n" | cut -d/ -f1 | sort -u)
rm -f "$stamp"
if [ -n "${OUT:-}" ] && [ -n "$changed" ]; then
    mkdir -p "$OUT/results"
    for name in $changed; do
        cp -r "$results/$name" "$OUT/results/" && echo "copied $results/$name to $OUT/results/$name"
    done
fi
[ -z "$changed" ] && echo "nothing in $results changed"
exit $rc
