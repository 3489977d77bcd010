#!/usr/bin/env bash
# Create or refresh the project-local virtual environment. Idempotent: when nothing that feeds
# the environment changed since the last successful run, it checks imports and exits in seconds.
#
# Usage: scripts/setup_env.sh [--check | --plan]
#   (no option)  create or refresh the environment
#   --check      only say whether the environment is up to date (exit 0) or would be refreshed (exit 1)
#   --plan       only print what a refresh would do with the venv and detectron2 (KEY=VALUE lines)
#   Neither option changes anything.
#
# Environment variables:
#   VENV=.venv             where the virtual environment lives
#   PYTHON=python3         interpreter used to create it
#   D2_SOURCE=/path        a local detectron2 source checkout: pip-installed with its C++ extension
#   FASHION_MNIST_DIR=/p   a folder with the original Fashion-MNIST IDX files; skips the Debian package
#   SETUP_FORCE=1          ignore the stamp and redo every step (never replaces a real detectron2 by
#                          the snapshot; rebuilds the remembered D2_SOURCE checkout, if any)
#
# detectron2 ("real" = its compiled extension detectron2._C loads), decided by d2_plan, first match:
#   1. D2_SOURCE given: build that checkout (full build, compiled ops included) and remember its path
#      in $VENV/.d2_bnstats_d2_source, so that later runs without D2_SOURCE keep the build (the
#      remembered path counts as D2_SOURCE for the stamp);
#   2. SETUP_FORCE=1 and a remembered checkout: build it again;
#   3. a real detectron2 importable in the venv, or in the system interpreter (a new venv is then
#      created with --system-site-packages): used as it is; torch and torchvision, which its
#      extension was built against, are installed only if they are missing;
#   4. a remembered checkout whose build no longer loads: build it again;
#   5. a detectron2 that imports but whose compiled extension does not load: stop with an error
#      (it is never replaced by the snapshot);
#   6. otherwise (no detectron2, or the snapshot below): the Python part of PyPI pb1-detectron2==0.6
#      (a 2022 snapshot of detectron2 main whose source archive lacks the C++ sources) is installed
#      without its extension, with a placeholder detectron2/_C.py that names the missing operation
#      and the remedy, and with the model-zoo configs of its source archive (which its own install
#      leaves out), so that detectron2.model_zoo.get_config_file works.
set -euo pipefail

MODE=run
case "${1:-}" in
    "") ;;
    --check) MODE=check ;;
    --plan) MODE=plan ;;
    *) printf 'usage: %s [--check | --plan]\n' "$0" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.d2_bnstats_env_stamp"
D2_REMEMBERED="$VENV/.d2_bnstats_d2_source"
D2_PYPI_SPEC="pb1-detectron2==0.6"
D2_PYPI_DIST="pb1-detectron2"
FASHION_MNIST_DEB="dataset-fashion-mnist"
PY="$ROOT/$VENV/bin/python"
[[ "$VENV" = /* ]] && PY="$VENV/bin/python"

log() { printf '[setup_env] %s\n' "$*" >&2; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }

remembered_source() { [[ -f "$D2_REMEMBERED" ]] && cat "$D2_REMEMBERED" || true; }
# The checkout this environment builds detectron2 from: D2_SOURCE, else the remembered one.
D2_SOURCE_ABS=""
[[ -n "${D2_SOURCE:-}" ]] && D2_SOURCE_ABS=$(realpath -m "$D2_SOURCE")
EFFECTIVE_SOURCE=${D2_SOURCE_ABS:-$(remembered_source)}

stamp_inputs() {
    # Everything whose change must trigger a refresh.
    cat scripts/setup_env.sh requirements/*.txt setup.py d2_bnstats/compat/detectron2_C_placeholder.py
    printf 'D2_SOURCE=%s\nFASHION_MNIST_DIR=%s\nPYTHON=%s\n' "$EFFECTIVE_SOURCE" "${FASHION_MNIST_DIR:-}" \
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

# Why the environment needs a refresh (empty: it is up to date).
refresh_reason() {
    if [[ "${SETUP_FORCE:-0}" == 1 ]]; then echo "SETUP_FORCE=1"
    elif [[ ! -f "$STAMP" ]]; then echo "no stamp $STAMP (never set up here)"
    elif [[ "$(cat "$STAMP")" != "$wanted_stamp" ]]; then echo "the set-up's inputs changed since the last run"
    elif ! fashion_mnist_present; then echo "Fashion-MNIST is missing"
    elif ! env_works; then echo "'import torch, torchvision, detectron2, pycocotools, d2_bnstats' fails in $VENV"
    fi
}

# What detectron2 an interpreter imports, without changing anything. One line:
#   none | placeholder DIR | real DIR | mixed DIR | broken DIR ERROR   (tab-separated)
# "mixed": a compiled extension together with the snapshot's distribution (the snapshot's Python
# files installed over a source build by an older version of this script).
d2_kind() {
    "$1" - "$D2_PYPI_DIST" <<'EOF' 2>/dev/null || printf 'broken\t?\tthe interpreter %s does not run\n' "$1"
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys

spec = importlib.util.find_spec("detectron2")
if spec is None or not spec.submodule_search_locations:
    print("none")
    sys.exit()
where = list(spec.submodule_search_locations)[0]
compiled = any(os.path.exists(os.path.join(where, "_C" + s)) for s in importlib.machinery.EXTENSION_SUFFIXES)
stub = os.path.join(where, "_C.py")
if not compiled and os.path.exists(stub):
    # the placeholder is standalone: load it as a file, without importing detectron2
    module_spec = importlib.util.spec_from_file_location("d2_placeholder_probe", stub)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        module = None
    if getattr(module, "IS_PLACEHOLDER", False) is True:
        print("placeholder", where, sep="\t")
        sys.exit()
try:
    import detectron2
    import detectron2._C
except Exception as e:
    print("broken", where, f"{type(e).__name__}: {e}".replace("\n", " "), sep="\t")
    sys.exit()
try:
    importlib.metadata.distribution(sys.argv[1])
    print("mixed" if compiled else "real", where, sep="\t")
except importlib.metadata.PackageNotFoundError:
    print("real", where, sep="\t")
EOF
}

# Would a new venv get --system-site-packages (the system interpreter imports a real detectron2)?
system_site_packages() {
    [[ -z "${D2_SOURCE:-}" ]] && [[ "$(d2_kind "$PYTHON" | cut -f1)" == real ]]
}

# The decision (see the header). One line: ACTION [ARGUMENT], ACTION in build | keep | snapshot | refuse.
d2_plan() {
    local kind where detail remembered
    if [[ -x "$PY" ]]; then
        IFS=$'\t' read -r kind where detail <<<"$(d2_kind "$PY")"
    elif system_site_packages; then
        IFS=$'\t' read -r kind where detail <<<"$(d2_kind "$PYTHON")"
    else
        kind=none
    fi
    remembered=$(remembered_source)
    if [[ -n "$D2_SOURCE_ABS" ]]; then echo "build $D2_SOURCE_ABS"
    elif [[ "${SETUP_FORCE:-0}" == 1 && -n "$remembered" ]]; then echo "build $remembered"
    elif [[ "$kind" == real ]]; then echo "keep $where"
    elif [[ -n "$remembered" ]]; then echo "build $remembered"
    elif [[ "$kind" == mixed ]]; then
        echo "refuse detectron2 in $where has a compiled extension but the Python files of $D2_PYPI_SPEC" \
            "(installed over it by an earlier set-up); rebuild it: D2_SOURCE=/path/to/detectron2 make env"
    elif [[ "$kind" == broken ]]; then
        echo "refuse detectron2 in $where imports, but its compiled extension does not load ($detail); rebuild it" \
            "(D2_SOURCE=/path/to/detectron2 make env), or uninstall it ($PY -m pip uninstall detectron2) for the default set-up"
    else echo "snapshot"
    fi
}

# The snapshot's model-zoo configs go into the installed package's model_zoo/configs.
model_zoo_configs_dir() {
    "$PY" -c 'import importlib.util as u, os; print(os.path.join(list(u.find_spec("detectron2").submodule_search_locations)[0], "model_zoo", "configs"))'
}
model_zoo_configs_present() { [[ -f "$(model_zoo_configs_dir)/Base-RCNN-FPN.yaml" ]]; }
snapshot_installed() { [[ "$(d2_kind "$PY" | cut -f1)" == placeholder ]] && "$PY" -m pip show "$D2_PYPI_DIST" >/dev/null 2>&1; }

if [[ "$MODE" == plan ]]; then
    plan=$(d2_plan)
    flags=""
    [[ ! -x "$PY" ]] && system_site_packages && flags="--system-site-packages"
    zoo=untouched
    if [[ "$plan" == snapshot ]]; then
        zoo=install
        [[ -x "$PY" && "$(d2_kind "$PY" | cut -f1)" == placeholder ]] && model_zoo_configs_present && zoo=present
    fi
    printf 'venv=%s\nvenv_flags=%s\ndetectron2=%s\nmodel_zoo_configs=%s\nd2_source=%s\nstamp=%s\nrefresh=%s\n' \
        "$VENV" "$flags" "$plan" "$zoo" "$EFFECTIVE_SOURCE" "$wanted_stamp" "$(refresh_reason)"
    exit 0
fi

reason=$(refresh_reason)
if [[ -z "$reason" ]]; then
    log "environment up to date ($VENV)"
    exit 0
fi
if [[ "$MODE" == check ]]; then
    log "environment not up to date ($VENV): $reason"
    exit 1
fi

# Decided before anything changes: a detectron2 that must not be replaced stops the set-up here.
read -r d2_action d2_arg <<<"$(d2_plan)"
[[ "$d2_action" == refuse ]] && die "$d2_arg"

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
if [[ ! -x "$PY" ]]; then
    venv_flags=()
    if system_site_packages; then
        log "the system interpreter imports a real detectron2: creating the venv with --system-site-packages"
        venv_flags+=(--system-site-packages)
    fi
    log "creating virtual environment $VENV"
    "$PYTHON" -m venv "${venv_flags[@]}" "$VENV"
fi
pip_install_checked() {
    if ! "$PY" -m pip install --disable-pip-version-check -q "$@" >"$VENV/.pip.log" 2>&1; then
        grep -v "^WARNING: Location" "$VENV/.pip.log" >&2
        die "pip install $* failed (full log: $VENV/.pip.log)"
    fi
}

if [[ "$d2_action" == keep ]] && "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    log "keeping the torch and torchvision that detectron2 in $d2_arg was built against"
else
    log "installing torch + torchvision (requirements/torch.txt)"
    pip_install_checked -r requirements/torch.txt
fi

# ---- detectron2 ------------------------------------------------------------------------------
# Downloads and unpacks the snapshot's source archive; sets $src.
fetch_snapshot_source() {
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # The sdist's setup.py imports torch, hence --no-build-isolation (torch is installed above).
    "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
        --no-build-isolation -d "$work" "$D2_PYPI_SPEC" >"$VENV/.pip.log" 2>&1 || true
    archive=$(ls "$work"/*.tar.gz 2>/dev/null | head -n1)
    [[ -n "$archive" ]] || die "could not download the source archive of $D2_PYPI_SPEC from PyPI (log: $VENV/.pip.log)"
    tar -xzf "$archive" -C "$work"
    src=$(ls -d "$work"/pb1-detectron2-*/ | head -n1)
}

constraints=()
case "$d2_action" in
build)
    [[ -f "$d2_arg/setup.py" ]] || die "D2_SOURCE=$d2_arg is not a detectron2 source checkout (no setup.py)"
    if "$PY" -m pip show "$D2_PYPI_DIST" >/dev/null 2>&1; then
        # its files (placeholder _C.py, the copied model-zoo configs) must not shadow the build's
        log "removing $D2_PYPI_SPEC before building detectron2"
        rm -rf "$(model_zoo_configs_dir)"
        "$PY" -m pip uninstall -y -q "$D2_PYPI_DIST" >"$VENV/.pip.log" 2>&1 || die "pip uninstall $D2_PYPI_DIST failed (log: $VENV/.pip.log)"
    fi
    log "building detectron2 from $d2_arg (with its C++ extension; this takes a while)"
    pip_install_checked "setuptools<81" wheel ninja
    pip_install_checked --no-build-isolation "$d2_arg"
    [[ "$(d2_kind "$PY" | cut -f1)" == real ]] || die "detectron2 was built from $d2_arg but its compiled extension does not load: $(d2_kind "$PY")"
    echo "$d2_arg" >"$D2_REMEMBERED"
    d2_summary="source build: $d2_arg"
    ;;
keep)
    d2_summary="already installed: $d2_arg"
    log "using the detectron2 already installed ($d2_arg)"
    ;;
snapshot)
    constraints=(-c requirements/detectron2-pypi-constraints.txt)
    pip_install_checked "${constraints[@]}" "setuptools<81" wheel
    if ! snapshot_installed; then
        log "installing the Python part of $D2_PYPI_SPEC without its C++ extension"
        fetch_snapshot_source
        grep -q "ext_modules=get_extensions()," "$src/setup.py" \
            || die "unexpected $D2_PYPI_SPEC setup.py: cannot disable its C++ extension"
        sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$src/setup.py"
        cp d2_bnstats/compat/detectron2_C_placeholder.py "$src/detectron2/_C.py"
        pip_install_checked "${constraints[@]}" --no-build-isolation "$src"
    fi
    if ! model_zoo_configs_present; then
        log "installing the model-zoo configs of $D2_PYPI_SPEC"
        [[ -n "${src:-}" ]] || fetch_snapshot_source
        [[ -d "$src/detectron2/model_zoo/configs" ]] || die "the source archive of $D2_PYPI_SPEC has no detectron2/model_zoo/configs"
        zoo=$(model_zoo_configs_dir)
        rm -rf "$zoo"
        cp -R "$src/detectron2/model_zoo/configs" "$zoo"
        chmod -R u+rwX,go+rX,go-w "$zoo"  # the archive's own modes are group-only
    fi
    d2_summary="$D2_PYPI_SPEC, Python part only (placeholder detectron2._C)"
    ;;
*) die "internal error: unknown detectron2 plan '$d2_action'" ;;
esac

# ---- the rest, and the plug-in itself ------------------------------------------------------
log "installing common requirements (requirements/common.txt)"
pip_install_checked "${constraints[@]}" -r requirements/common.txt
log "installing d2_bnstats in editable mode"
pip_install_checked "${constraints[@]}" --no-build-isolation --no-deps -e .

env_works || die "the environment was installed but 'import detectron2, d2_bnstats' fails; run $PY -c 'import d2_bnstats' to see why"
echo "$wanted_stamp" >"$STAMP"
log "environment ready ($VENV; detectron2: $d2_summary)"
