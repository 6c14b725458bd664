#!/usr/bin/env bash
# The one command to run on a machine with a GPU (see README, "GPU check"):
# the GPU tests (Triton and CUDA kernels against the torch backend, training runs on
# each backend) and the step / kernel benchmark, written as gpu-check.{json,md} and
# the test log under $OUT (bench/results/ when $OUT is unset). Sized for under 8 minutes on an
# H200 (tests 150 s + 60 s, the benchmark 270 s: BERT-base full and LoRA, a Llama-like decoder with LoRA
# and full fine-tuning, the kernel rows; first run on one 2026-11-30, these workloads not yet run).
#
#   bash bench/gpu_check.sh --prepare   # here, once: the wheels the GPU machine lacks, into .whl/
#   bash bench/gpu_check.sh             # on the GPU machine (carry .whl)
#   bash bench/gpu_check.sh --dry-run   # anywhere: CPU, Triton interpreter, tiny sizes (CI runs this)
#
# Needs torch and triton; `import anadp` and every anadp row need nothing more. The device image
# (KINDS.md) has transformers, peft, scipy and opt_einsum but not Opacus: the Opacus rows need the wheel
# opacus==1.6.0 (pure Python), which --prepare downloads into .whl/ and this script installs from there
# into a side folder; without it those rows say "skipped".
#
# Worst case 8 minutes: every stage's timeout is cut to what is left of DEADLINE_S.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(opacus==1.6.0)
if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .whl
    grep -qs '^/.whl/$' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    exec "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi
DRY=""
[[ "${1:-}" == "--dry-run" ]] && DRY="--dry-run"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
DEADLINE_S=${DEADLINE_S:-470}
SECONDS=0
left() {  # the stage's own cap, or what is left of the deadline if that is less (at least 1 s)
    local rest=$(( DEADLINE_S - SECONDS ))
    (( rest < 1 )) && rest=1
    echo $(( $1 < rest ? $1 : rest ))
}

# a killed build of the CPU kernels leaves torch's lock in its folder, on which every later run waits
find "${ANADP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/anadp}" -name lock -mmin +15 -print -delete 2>/dev/null

if ! "$PY" -c "import opacus" 2>/dev/null; then
    shopt -s nullglob
    wheels=(.whl/opacus-*.whl)
    if (( ${#wheels[@]} )); then  # as the device README says: into a side folder on PYTHONPATH
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${wheels[@]}" && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
            || echo "opacus wheel did not install: no Opacus rows"
    else
        echo "opacus not installed and no .whl/opacus-*.whl: no Opacus rows"
    fi
fi

# the CUDA extension, where nvcc and a GPU are there and it is not built yet: in the background
# while the Triton tests run (its tests and rows come after it)
build_pid=""
if [[ -z "$DRY" ]] && command -v nvcc >/dev/null && ! "$PY" -c "import anadp._cuda" 2>/dev/null; then
    ( MAX_JOBS=8 ANADP_BUILD_CUDA=1 timeout "$(left 200)" "$PY" setup.py build_ext --inplace > "$OUT_DIR/cuda-build.log" 2>&1 \
        || echo "CUDA extension did not build (see $OUT_DIR/cuda-build.log): cuda rows skipped" ) &
    build_pid=$!
fi

PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && [[ -z "$DRY" ]] && PARALLEL=(-n 4)
if [[ -n "$DRY" ]]; then
    export TRITON_INTERPRET=1
    TESTS=(tests/test_kernels.py -k "noise or embedding")
else
    TESTS=(tests/test_kernels.py tests/test_backend.py tests/test_philox.py -k "not cuda")
fi
timeout "$(left 150)" "$PY" -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" "${TESTS[@]}" > "$OUT_DIR/gpu-tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT_DIR/gpu-tests.log"
echo "gpu_check: triton tests rc=$tests_rc after ${SECONDS} s"
if [[ -n "$build_pid" ]]; then
    wait "$build_pid"
    echo "gpu_check: CUDA build done after ${SECONDS} s"
fi
if [[ -z "$DRY" ]]; then
    timeout "$(left 50)" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ext.py tests/test_kernels.py tests/test_backend.py \
        -k "cuda" >> "$OUT_DIR/gpu-tests.log" 2>&1
    cuda_rc=$?
    tail -3 "$OUT_DIR/gpu-tests.log"
    echo "gpu_check: cuda tests rc=$cuda_rc after ${SECONDS} s"
    (( cuda_rc != 0 && cuda_rc != 5 )) && tests_rc=$cuda_rc  # 5: nothing collected
fi

timeout "$(left 270)" "$PY" -m bench.gpu_step $DRY --out "$OUT_DIR"
bench_rc=$?
echo "gpu_check: tests rc=$tests_rc, benchmark rc=$bench_rc after ${SECONDS} s, results in $OUT_DIR"
exit $(( tests_rc != 0 || bench_rc != 0 ))
