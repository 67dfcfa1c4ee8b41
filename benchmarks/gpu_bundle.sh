#!/usr/bin/env bash
# Build the offline install bundle for a GPU node without network (run where the package index is):
# wheels for Python 3.12 on manylinux x86-64 of everything the GPU suite imports that a torch + Triton image
# lacks (megatron-core, DeepSpeed built here as a pure-Python wheel with its ops off, pydantic, zstandard,
# sentencepiece, PyYAML, ... pinned by constraints.txt), the project's own wheel, and a manifest. Prints its
# size (tree + bundle must fit in 64 MiB) and the command to run on the node.
#
#   bash benchmarks/gpu_bundle.sh                            # -> .gpu-bundle/ for the node's Python 3.12
#   bash benchmarks/gpu_bundle.sh --python-version 3.11 --out /tmp/b   # for another Python (tests: this one's)
#
# Options: --python-version X.Y (default 3.12); --platform TAG (repeatable; default manylinux x86-64 up to
# glibc 2.28); --out DIR (default .gpu-bundle); --limit-mib N (default 64). Exit 2: bad arguments; 3: too big.
# DeepSpeed's wheel is cached in .cache/gpu-bundle/ (the same py3-none-any wheel serves every Python).
set -euo pipefail
CALLER=$(pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY_VERSION=3.12
OUT=.gpu-bundle
LIMIT_MIB=64
PLATFORMS=()
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) PY_VERSION=${2:?--python-version needs X.Y}; shift 2 ;;
        --platform) PLATFORMS+=("${2:?--platform needs a tag}"); shift 2 ;;
        --out) OUT=${2:?--out needs a folder}; [[ "$OUT" == /* ]] || OUT="$CALLER/$OUT"; shift 2 ;;
        --limit-mib) LIMIT_MIB=${2:?--limit-mib needs a number}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_bundle: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [[ ! "$PY_VERSION" =~ ^3\.[0-9]+$ ]]; then
    echo "gpu_bundle: --python-version '$PY_VERSION': expected MAJOR.MINOR such as 3.12" >&2; exit 2
fi
if [[ ! "$LIMIT_MIB" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "gpu_bundle: --limit-mib '$LIMIT_MIB': expected a number of MiB" >&2; exit 2
fi
if [[ ${#PLATFORMS[@]} -eq 0 ]]; then  # pip takes each tag literally: list the glibc versions wheels are built for
    PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64
               manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux1_x86_64)
fi
# The builder needs pip, setuptools and torch (DeepSpeed's setup.py imports it): the project's venv has them.
PYTHON=${PYTHON:-python3}
if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; fi
TOOL=(env PYTHONDONTWRITEBYTECODE=1 "$PYTHON" benchmarks/gpu_bundle_tool.py)
ABI="cp${PY_VERSION/./}"

STAGE="$OUT.partial"  # built here, renamed into place only when complete and within the size limit
SRC=$(mktemp -d)
trap 'rm -rf "$STAGE" "$SRC"' EXIT
rm -rf "$STAGE"
mkdir -p "$STAGE" .cache/gpu-bundle
mapfile -t PINS < <("${TOOL[@]}" pins)
PLATFORM_ARGS=()
for p in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$p"); done
echo "gpu_bundle: downloading ${#PINS[@]} wheels for CPython $PY_VERSION (${PLATFORMS[0]} ...)"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --abi "$ABI" "${PLATFORM_ARGS[@]}" -d "$STAGE" "${PINS[@]}"

DS_VERSION=$(grep -i '^deepspeed==' constraints.txt | cut -d= -f3)
DS_WHEEL=.cache/gpu-bundle/deepspeed-$DS_VERSION-py3-none-any.whl
if [[ ! -f "$DS_WHEEL" ]]; then
    echo "gpu_bundle: building DeepSpeed $DS_VERSION as a pure-Python wheel (DS_BUILD_OPS=0: its ops JIT-build on use)"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$SRC/ds" "deepspeed==$DS_VERSION"
    mv "$SRC/ds/$(basename "$DS_WHEEL")" "$DS_WHEEL.tmp" && mv "$DS_WHEEL.tmp" "$DS_WHEEL"
fi
cp "$DS_WHEEL" "$STAGE/"

# The project's wheel from a clean copy of its sources (an in-tree build/ could carry deleted modules along).
mkdir -p "$SRC/project"
cp -r setup.py pyproject.toml hgrn_megatron kernels tokenizer pretrain "$SRC/project/"
find "$SRC/project" -name __pycache__ -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$STAGE" "$SRC/project"

"${TOOL[@]}" manifest "$STAGE" --python-version "$PY_VERSION"
if ! "${TOOL[@]}" size "$STAGE" --limit-mib "$LIMIT_MIB"; then
    echo "gpu_bundle: refused: nothing written to $OUT" >&2
    exit 3
fi
rm -rf "$OUT"
mv "$STAGE" "$OUT"
echo "gpu_bundle: wrote $OUT ($(du -sh "$OUT" | cut -f1)); on the node, from the repository root, with $OUT beside it:"
echo "    bash benchmarks/gpu_suite.sh --bundle $OUT"
