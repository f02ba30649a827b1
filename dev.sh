#!/usr/bin/env bash
# Set up from nothing and run egp_fast's main job or its tests.
#
#   ./dev.sh demo [egp-fast options]   EGP on the embedded digits data (train, prune, collapse)
#   ./dev.sh test [pytest options]     the test suite (slow tests deselected)
#   ./dev.sh setup                     only create/refresh the virtual environment
#   ./dev.sh freeze                    write constraints.txt from the virtual environment
#
# Installs are pinned: every package comes at the exact version in constraints.txt, the set
# that CI last passed with, so an upstream release cannot turn a fresh clone red overnight.
# EGP_FAST_LATEST=1 ignores the pins and upgrades everything to the newest releases (use a
# separate EGP_FAST_VENV); when that passes, `./dev.sh freeze` records the new set.
#
# The virtual environment lives in $EGP_FAST_VENV (default .venv). torch is installed first
# and the package with --no-build-isolation, so torch is not downloaded twice to build the
# C++/CUDA extension. Set EGP_FAST_BUILD_EXT=0 for a pure-Python install.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${EGP_FAST_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${EGP_FAST_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
CONSTRAINTS="constraints.txt"
LATEST="${EGP_FAST_LATEST:-0}"
DEPS=(numpy tqdm ninja pybind11 pytest pytest-benchmark hypothesis scikit-learn matplotlib timm "transformers>=4.40")

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "dev.sh: creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    local pins=(-c "$CONSTRAINTS")
    if [ "$LATEST" = "1" ]; then
        echo "dev.sh: EGP_FAST_LATEST=1: ignoring $CONSTRAINTS, upgrading to the newest releases"
        pins=(--upgrade --upgrade-strategy eager)
    fi
    # Re-install only when the build inputs changed since the last setup.
    local stamp="$VENV/.egp_fast_stamp"
    local want
    want="$(cat setup.py pyproject.toml "$CONSTRAINTS" $(find csrc -type f 2>/dev/null | sort) 2>/dev/null | sha1sum | cut -c1-40) ${TORCH_SPEC} ${EGP_FAST_BUILD_EXT:-1} latest=${LATEST}"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "dev.sh: installing torch and dependencies into $VENV"
    "${pip[@]}" install "${pins[@]}" pip setuptools wheel
    # shellcheck disable=SC2086
    "${pip[@]}" install "${pins[@]}" $TORCH_SPEC
    "${pip[@]}" install "${pins[@]}" "${DEPS[@]}"
    echo "dev.sh: building egp_fast (C++/CUDA extension; a few minutes on 2 cores)"
    MAX_JOBS="${MAX_JOBS:-2}" "${pip[@]}" install "${pins[@]}" --no-build-isolation -e ".[test,demo,timm,hf]"
    "$VENV/bin/python" -c "import egp_fast; print('dev.sh: egp_fast', egp_fast.__version__, 'backends:', egp_fast.available_backends())"
    "$VENV/bin/python" -m pip list --disable-pip-version-check --format freeze 2>/dev/null \
        | grep -iE '^(torch|torchvision|triton|timm|transformers|kernels|numpy|scikit-learn|pytest)==' \
        | tr '\n' ' ' | sed 's/^/dev.sh: versions: /; s/ $/\n/'
    echo "$want" > "$stamp"
}

# The exact set installed now, as pins for the next fresh clone (run after a green test run).
freeze() {
    {
        echo "# Exact versions CI passes with; dev.sh installs with -c $CONSTRAINTS."
        echo "# Refresh: EGP_FAST_LATEST=1 EGP_FAST_VENV=/tmp/latest ./dev.sh test, then"
        echo "#          EGP_FAST_VENV=/tmp/latest ./dev.sh freeze, and commit this file."
        "$VENV/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check | grep -v '^-e '
    } > "$CONSTRAINTS.tmp"
    mv "$CONSTRAINTS.tmp" "$CONSTRAINTS"
    echo "dev.sh: wrote $CONSTRAINTS ($(grep -vc '^#' "$CONSTRAINTS") pins) from $VENV"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    freeze) freeze ;;
    demo) setup; exec "$VENV/bin/egp-fast" demo "$@" ;;
    test) setup; exec "$VENV/bin/python" -m pytest -q -m "not slow" "$@" ;;
    *) echo "usage: ./dev.sh demo|test|setup|freeze [args...]" >&2; exit 2 ;;
esac
