#!/usr/bin/env bash
# The GPU check in one call of at most 8 minutes on one CUDA device, without network:
#   1. the CUDA tests (pytest tests -k cuda), with a JUnit report;
#   2. `fastkd bench` at the full CUDA sizes: the losses, fused_linear_kl and the runner steps,
#      against eager PyTorch, torch.compile and Liger-Kernel (installed from the wheels in .whl/).
#
# Run from anywhere; the repository is put on PYTHONPATH (no install). Fetch the Liger wheel first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl liger-kernel
# and carry .whl/ to the device machine. Output (6 files) under $OUT (default /tmp/fastkd-gpu):
#   gpu.log  env.txt  junit-cuda.xml  bench/results.json  bench/results.md  bench/results.png
# A failing step does not stop the next; each step has a time limit, all of them within TOTAL_S.

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO
OUT=${OUT:-/tmp/fastkd-gpu}
TOTAL_S=${TOTAL_S:-455}        # the whole script (a step may overrun its limit by 10 s when killed)
TEST_S=${TEST_S:-150}          # the CUDA tests
BENCH_ARGS=${BENCH_ARGS:-}     # extra `fastkd bench` arguments, e.g. "--size tiny" for a dry run
mkdir -p "$OUT/bench"
exec > >(tee -a "$OUT/gpu.log") 2>&1
START=$SECONDS
SUMMARY=()

# step NAME LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (and never past TOTAL_S).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_S - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: skipped, out of time"
        SUMMARY+=("$name: skipped")
        return 0
    fi
    echo "== $name (limit ${limit}s, at $((SECONDS - START))s)"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - START))s"
    SUMMARY+=("$name: exit $rc")
    return 0
}

environment() {
    nvidia-smi
    python3 - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "transformers", "liger-kernel", "pytest", "hypothesis", "matplotlib", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
}

install_liger() {
    shopt -s nullglob
    local wheels=("$REPO"/.whl/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in $REPO/.whl: the liger rows will be missing"
        return 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${wheels[@]}"
}

export -f environment install_liger
cd "$REPO" || exit 1
export PYTHONPATH="/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

step "install liger-kernel" 60 bash -c install_liger
step "environment" 30 bash -c environment > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step "cuda tests" "$TEST_S" python3 -m pytest tests -k cuda -x -q -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$OUT/junit-cuda.xml"
# results.json is rewritten after every case, so a run cut short still leaves what it measured;
# the last 25 s are kept to turn it into results.md and results.png then.
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
step "fastkd bench" $((TOTAL_S - (SECONDS - START) - 25)) python3 -m fastkd bench --keep-going --out "$OUT/bench" $BENCH_ARGS
if [[ -f $OUT/bench/results.json && ! -f $OUT/bench/results.md ]]; then
    step "render partial results" 25 python3 -c 'import json, pathlib, sys
from fastkd.bench import report
out = pathlib.Path(sys.argv[1])
results = json.loads((out / "results.json").read_text())
results["failures"].append("fastkd bench was stopped by its time limit after the cases above")
report.write(results, out)' "$OUT/bench"
fi

echo "== summary after $((SECONDS - START))s"
printf '  %s\n' "${SUMMARY[@]}"
