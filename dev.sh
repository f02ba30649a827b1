#!/usr/bin/env bash
# Set up from nothing and run egp_fast's main job or its tests.
#
#   ./dev.sh demo [egp-fast options]   EGP on the embedded digits data (train, prune, collapse)
#   ./dev.sh test [pytest options]     the test suite (slow tests deselected)
#   ./dev.sh setup                     only create/refresh the virtual environment
#
# The virtual environment lives in $EGP_FAST_VENV (default .venv). torch is installed first
# and the package with --no-build-isolation, so torch is not downloaded twice to build the
# C++/CUDA extension. Set EGP_FAST_BUILD_EXT=0 for a pure-Python install.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${EGP_FAST_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${EGP_FAST_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "dev.sh: creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    # Re-install only when the build inputs changed since the last setup.
    local stamp="$VENV/.egp_fast_stamp"
    local want
    want="$(cat setup.py pyproject.toml $(find csrc -type f 2>/dev/null | sort) 2>/dev/null | sha1sum | cut -c1-40) ${TORCH_SPEC} ${EGP_FAST_BUILD_EXT:-1}"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "dev.sh: installing torch and dependencies into $VENV"
    "${pip[@]}" install --upgrade pip setuptools wheel
    # shellcheck disable=SC2086
    "${pip[@]}" install $TORCH_SPEC
    "${pip[@]}" install numpy tqdm ninja pybind11 pytest pytest-benchmark hypothesis scikit-learn matplotlib timm "transformers>=4.40"
    echo "dev.sh: building egp_fast (C++/CUDA extension; a few minutes on 2 cores)"
    MAX_JOBS="${MAX_JOBS:-2}" "${pip[@]}" install --no-build-isolation -e ".[test,demo,timm,hf]"
    "$VENV/bin/python" -c "import egp_fast; print('dev.sh: egp_fast', egp_fast.__version__, 'backends:', egp_fast.available_backends())"
    echo "$want" > "$stamp"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    demo) setup; exec "$VENV/bin/egp-fast" demo "$@" ;;
    test) setup; exec "$VENV/bin/python" -m pytest -q -m "not slow" "$@" ;;
    *) echo "usage: ./dev.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
