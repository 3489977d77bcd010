#!/usr/bin/env bash
# Put into a git-ignored folder (default wheels/gpu/) what scripts/gpu_check.sh installs on a GPU
# machine that has python 3.12 with torch and torchvision but no detectron2 and no network:
#
#   * pb1_detectron2-0.6-py3-none-any.whl: the Python part of the PyPI snapshot pb1-detectron2==0.6
#     built here as scripts/setup_env.sh installs it (no C++ extension, the placeholder detectron2/_C.py,
#     the model-zoo configs inside the package), with one change for Pillow >= 10 (which that machine
#     has): Image.LINEAR, removed in Pillow 10, read as Image.BILINEAR (the same constant, 2);
#   * the pure-Python dependencies (fvcore and antlr4-python3-runtime are source-only on PyPI and
#     are built into wheels here), pycocotools for CPython 3.12 on manylinux x86_64, and
#     setuptools < 81 (detectron2's model zoo imports pkg_resources);
#   * fashion-mnist/: the first images of Fashion-MNIST (gzip IDX files, read from FASHION_MNIST_DIR or
#     the Debian package dataset-fashion-mnist), enough for the tiny fashion-scenes split the tests build.
#
# Usage: scripts/fetch_gpu_wheels.sh [FOLDER]     (needs PyPI; the project venv for building)
# Environment: PY (default .venv/bin/python), FASHION_MNIST_DIR, FASHION_MNIST_IMAGES (default 2000).
# The folder is rebuilt from scratch; its size is printed (it travels with the working tree, whose
# limit on the GPU machine is 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-wheels/gpu}
PY=${PY:-.venv/bin/python}
IMAGES=${FASHION_MNIST_IMAGES:-2000}
# The versions of the project's environment (scripts/setup_env.sh), for CPython 3.12.
PURE=(fvcore==0.1.5.post20221221 iopath==0.1.9 yacs==0.1.8 termcolor==3.3.0 omegaconf==2.3.1
      hydra-core==1.3.8 antlr4-python3-runtime==4.9.3 "setuptools==80.10.2")
BINARY=(pycocotools==2.0.11)
D2_SPEC=pb1-detectron2==0.6
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

log() { printf '[fetch_gpu_wheels] %s\n' "$*" >&2; }
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

rm -rf "$OUT"
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "wheels of the dependencies (CPython 3.12, manylinux x86_64)"
pip download --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$OUT" "${BINARY[@]}"
for spec in "${PURE[@]}"; do
    # a wheel where PyPI has one, else the source archive built into a (pure-Python) wheel here
    pip download --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$OUT" "$spec" 2>/dev/null \
        || pip wheel --no-deps -w "$OUT" "$spec"
done

log "the Python part of $D2_SPEC"
pip download --no-deps --no-binary :all: --no-build-isolation -d "$work" "$D2_SPEC"
tar -xzf "$work"/pb1-detectron2-*.tar.gz -C "$work"
src=$(ls -d "$work"/pb1-detectron2-*/)
grep -q "ext_modules=get_extensions()," "$src/setup.py" || { log "unexpected setup.py in $D2_SPEC"; exit 1; }
sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$src/setup.py"
sed -i 's|package_data={"detectron2.model_zoo": get_model_zoo_configs()},|package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},|' "$src/setup.py"
sed -i 's/Image\.LINEAR/Image.BILINEAR/' "$src/detectron2/data/transforms/transform.py"
cp d2_bnstats/compat/detectron2_C_placeholder.py "$src/detectron2/_C.py"
# the sdist's setup.py imports torch: build with the project's environment
pip wheel --no-deps --no-build-isolation -w "$OUT" "$src"
wheel=$(ls "$OUT"/pb1_detectron2-*.whl)
case "$wheel" in *-py3-none-any.whl) ;; *) log "$wheel is not a pure-Python wheel"; exit 1 ;; esac
"$PY" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
needed = ["detectron2/_C.py", "detectron2/model_zoo/configs/Base-RCNN-FPN.yaml"]
missing = [n for n in needed if n not in names]
sys.exit(f"{sys.argv[1]} lacks {missing}" if missing else 0)
EOF

log "the first $IMAGES images of Fashion-MNIST"
"$PY" - "$OUT/fashion-mnist" "$IMAGES" <<'EOF'
import gzip, os, struct, sys

from bnstats_lab.data.fashion_mnist import fashion_mnist_dir, load_fashion_mnist

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
out, keep = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
for split, stems in FILES.items():
    images, labels = load_fashion_mnist(split)
    n = min(keep if split == "train" else max(1, keep // 4), len(labels))
    for stem, array in zip(stems, (images[:n], labels[:n])):
        header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
        with gzip.open(os.path.join(out, stem + ".gz"), "wb") as f:
            f.write(header + array.astype("uint8").tobytes())
print(f"from {fashion_mnist_dir()}", file=sys.stderr)
EOF

ls -1 "$OUT"
du -sh "$OUT" | awk '{print "[fetch_gpu_wheels] total: " $1}' >&2
