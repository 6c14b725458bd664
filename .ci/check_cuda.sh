#!/usr/bin/env bash
# Compile check of csrc/ without a GPU (.ci/run calls it): every .cu file for sm_80 and
# sm_90 with all warnings as errors, and bindings.cpp syntax-checked against torch's headers
# (host warnings as errors). Skipped, with the reason, where nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/../csrc"
PY="${PYTHON:-python}"
if ! command -v nvcc >/dev/null; then
    echo "csrc compile check skipped: nvcc not found"
    exit 0
fi
# nvcc's own include directory (nvcc may be a wrapper script): ask it
CUDA_INC="$(nvcc -dryrun -c -x cu /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for f in *.cu; do
    for arch in 80 90; do
        nvcc -std=c++17 -arch="sm_$arch" --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -c "$f" -o "$tmp/$f.$arch.o"
        echo "ok  nvcc sm_$arch $f"
    done
done
# CPU builds of torch ship c10/cuda headers but not the generated cuda_cmake_macros.h: a stub stands in
mkdir -p "$tmp/stub/c10/cuda/impl"
echo "#define C10_CUDA_BUILD_SHARED_LIBS" > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
sys_inc=(-isystem "$tmp/stub" -isystem "$CUDA_INC")
for d in $("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))") \
         $("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])"); do
    sys_inc+=(-isystem "$d")
done
"${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=_cuda "${sys_inc[@]}" bindings.cpp
echo "ok  g++ -fsyntax-only bindings.cpp"
