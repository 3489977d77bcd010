#!/usr/bin/env bash
# Create or refresh the project-local virtual environment. Idempotent: when nothing that feeds
# the environment changed since the last successful run, it checks imports and exits in seconds.
#
# Environment variables:
#   VENV=.venv             where the virtual environment lives
#   PYTHON=python3         interpreter used to create it
#   D2_SOURCE=/path        a local detectron2 source checkout: pip-installed with its C++ extension
#   FASHION_MNIST_DIR=/p   a folder with the original Fashion-MNIST IDX files; skips the Debian package
#   SETUP_FORCE=1          ignore the stamp and redo every step
#
# detectron2, in order of preference:
#   1. D2_SOURCE given: build that checkout (full build, compiled ops included);
#   2. an importable detectron2 already in the venv, or in the system interpreter (the venv is then
#      created with --system-site-packages): used as it is;
#   3. otherwise the Python part of PyPI pb1-detectron2==0.6 (a 2022 snapshot of detectron2 main
#      whose source archive lacks the C++ sources) is installed without its extension, with a
#      placeholder detectron2/_C.py that names the missing operation and the remedy.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.d2_bnstats_env_stamp"
D2_PYPI_SPEC="pb1-detectron2==0.6"
FASHION_MNIST_DEB="dataset-fashion-mnist"

log() { printf '[setup_env] %s\n' "$*" >&2; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }

stamp_inputs() {
    # Everything whose change must trigger a refresh.
    cat scripts/setup_env.sh requirements/*.txt setup.py d2_bnstats/compat/detectron2_C_placeholder.py
    printf 'D2_SOURCE=%s\nFASHION_MNIST_DIR=%s\nPYTHON=%s\n' "${D2_SOURCE:-}" "${FASHION_MNIST_DIR:-}" \
        "$("$PYTHON" -c 'import sys; print(sys.version)' 2>/dev/null)"
}
wanted_stamp=$(stamp_inputs | sha256sum | cut -d' ' -f1)

fashion_mnist_present() {
    if [[ -n "${FASHION_MNIST_DIR:-}" ]]; then
        [[ -d "$FASHION_MNIST_DIR" ]]
    else
        dpkg -s "$FASHION_MNIST_DEB" >/dev/null 2>&1
    fi
}

env_works() {
    [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import torch, torchvision, detectron2, pycocotools, d2_bnstats
from detectron2.modeling import build_model  # noqa: F401  (pulls in layers, incl. _C users)
EOF
}

if [[ "${SETUP_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$wanted_stamp" ]] \
        && fashion_mnist_present && env_works; then
    log "environment up to date ($VENV)"
    exit 0
fi

# ---- Debian packages -------------------------------------------------------------------------
if ! fashion_mnist_present; then
    if [[ -n "${FASHION_MNIST_DIR:-}" ]]; then
        die "FASHION_MNIST_DIR=$FASHION_MNIST_DIR is not a directory (expected the four Fashion-MNIST IDX files)"
    fi
    SUDO=""
    if [[ $(id -u) != 0 ]]; then
        command -v sudo >/dev/null || die "installing the Debian package $FASHION_MNIST_DEB needs root or sudo; or set FASHION_MNIST_DIR to a folder of the Fashion-MNIST IDX files"
        SUDO=sudo
    fi
    log "installing Debian package $FASHION_MNIST_DEB"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$FASHION_MNIST_DEB" >/dev/null
fi

# ---- virtual environment ---------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    venv_flags=()
    if [[ -z "${D2_SOURCE:-}" ]] && "$PYTHON" -c "import detectron2" >/dev/null 2>&1; then
        log "the system interpreter already imports detectron2: creating the venv with --system-site-packages"
        venv_flags+=(--system-site-packages)
    fi
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "${venv_flags[@]}" "$VENV"
fi
PY="$ROOT/$VENV/bin/python"
[[ "$VENV" = /* ]] && PY="$VENV/bin/python"
pip_install_checked() {
    if ! "$PY" -m pip install --disable-pip-version-check -q "$@" >"$VENV/.pip.log" 2>&1; then
        grep -v "^WARNING: Location" "$VENV/.pip.log" >&2
        die "pip install $* failed (full log: $VENV/.pip.log)"
    fi
}

log "installing torch + torchvision (requirements/torch.txt)"
pip_install_checked -r requirements/torch.txt

# ---- detectron2 ------------------------------------------------------------------------------
constraints=()
d2_kind=""
if [[ -n "${D2_SOURCE:-}" ]]; then
    [[ -f "$D2_SOURCE/setup.py" ]] || die "D2_SOURCE=$D2_SOURCE is not a detectron2 source checkout (no setup.py)"
    log "building detectron2 from $D2_SOURCE (with its C++ extension; this takes a while)"
    pip_install_checked "setuptools<81" wheel ninja
    pip_install_checked --no-build-isolation "$D2_SOURCE"
    d2_kind="source build: $D2_SOURCE"
elif "$PY" -c "import detectron2" >/dev/null 2>&1 \
        && ! "$PY" -c "import detectron2._C as c, sys; sys.exit(getattr(c, 'IS_PLACEHOLDER', False))" >/dev/null 2>&1 \
        && ! "$PY" -m pip show pb1-detectron2 >/dev/null 2>&1; then
    d2_kind="already installed: $("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
    log "using the detectron2 already installed ($d2_kind)"
else
    constraints=(-c requirements/detectron2-pypi-constraints.txt)
    pip_install_checked "${constraints[@]}" "setuptools<81" wheel
    if ! "$PY" -m pip show pb1-detectron2 >/dev/null 2>&1; then
        log "installing the Python part of $D2_PYPI_SPEC without its C++ extension"
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        # The sdist's setup.py imports torch, hence --no-build-isolation (torch is installed above).
        "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
            --no-build-isolation -d "$work" "$D2_PYPI_SPEC" >"$VENV/.pip.log" 2>&1 || true
        archive=$(ls "$work"/*.tar.gz 2>/dev/null | head -n1)
        [[ -n "$archive" ]] || die "could not download the source archive of $D2_PYPI_SPEC from PyPI (log: $VENV/.pip.log)"
        tar -xzf "$archive" -C "$work"
        src=$(ls -d "$work"/pb1-detectron2-*/ | head -n1)
        grep -q "ext_modules=get_extensions()," "$src/setup.py" \
            || die "unexpected $D2_PYPI_SPEC setup.py: cannot disable its C++ extension"
        sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$src/setup.py"
        cp d2_bnstats/compat/detectron2_C_placeholder.py "$src/detectron2/_C.py"
        pip_install_checked "${constraints[@]}" --no-build-isolation "$src"
    fi
    d2_kind="$D2_PYPI_SPEC, Python part only (placeholder detectron2._C)"
fi

# ---- the rest, and the plug-in itself ------------------------------------------------------
log "installing common requirements (requirements/common.txt)"
pip_install_checked "${constraints[@]}" -r requirements/common.txt
log "installing d2_bnstats in editable mode"
pip_install_checked "${constraints[@]}" --no-build-isolation --no-deps -e .

env_works || die "the environment was installed but 'import detectron2, d2_bnstats' fails; run $PY -c 'import d2_bnstats' to see why"
echo "$wanted_stamp" >"$STAMP"
log "environment ready ($VENV; detectron2: $d2_kind)"
