# Sourced by the one-call scripts for a lent GPU machine (tools/gpu_quality.sh, tools/gpu_bench.sh), from the
# repository root. That machine has torch, timm, accelerate, transformers and numpy 2 (Python 3.12) but not
# open_clip_torch, webdataset, pydantic or ftfy, and no network: the wheels travel in .whl/ (carry it), the CIFAR-10
# tarball in .device-data/.
#
#   device_prepare              here: the wheels -> .whl/ (webdataset 0.2.86 for open_clip_train -> .whl/old/),
#                               the CIFAR-10 tarball -> .device-data/ (both ignored by git)
#   device_install              there: installs .whl/*.whl with --target /tmp/site when a package is missing, and
#                               exports PYTHONPATH (the repo first), HF_HUB_OFFLINE, VLP_CIFAR_TARBALL
#   device_old_webdataset DIR   there: webdataset 0.2.86 from .whl/old/ into DIR (where benchlib.wds_old looks for
#                               it: CACHE/cache/webdataset-0.2.86), unless DIR holds it already

VLP_WHEELS=(open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 pydantic==2.13.4 pydantic_core==2.46.4
            annotated_types==0.7.0 typing_inspection==0.4.2 ftfy==6.3.1 wcwidth==0.7.0)
VLP_OLD_WHEELS=(webdataset==0.2.86)  # open_clip_train 3.3's loader breaks on webdataset 1.x; installed apart

device_prepare() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  grep -qx '/.device-data/' .git/info/exclude 2>/dev/null || echo '/.device-data/' >> .git/info/exclude
  local tmp=.whl.tmp platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  rm -rf "$tmp" && mkdir -p "$tmp/old" .device-data
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$tmp" "${VLP_WHEELS[@]}"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$tmp/old" "${VLP_OLD_WHEELS[@]}"
  rm -rf .whl && mv "$tmp" .whl  # one version of each wheel: a stale one would stop the install there
  local tarball=${VLP_CIFAR_TARBALL:-../shared/data/cifar10-train.tar.gz}
  cmp -s "$tarball" .device-data/cifar10-train.tar.gz || cp "$tarball" .device-data/cifar10-train.tar.gz
  du -sh .whl .device-data
}

device_install() {
  local repo=$PWD
  if ! python3 -c "import open_clip, webdataset, pydantic, ftfy" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
  if [ -f .device-data/cifar10-train.tar.gz ]; then
    export VLP_CIFAR_TARBALL=${VLP_CIFAR_TARBALL:-$PWD/.device-data/cifar10-train.tar.gz}
  fi
}

device_old_webdataset() {
  local dir=$1
  [ -f "$dir/webdataset/__init__.py" ] && return 0
  ls .whl/old/webdataset-*.whl >/dev/null 2>&1 || { echo "no .whl/old/webdataset-*.whl (run prepare)" >&2; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$dir" .whl/old/webdataset-*.whl
}
