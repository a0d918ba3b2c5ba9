#!/usr/bin/env bash
# The speed measurements of docs/benchmarks.md on one GPU, in parts that each fit a 10-minute call.
#
#   bash scripts/gpu_suite.sh check     # tests/test_gpu.py: --cuda-graph, --grouped-peers, bf16 vs eager fp32 on CUDA
#   bash scripts/gpu_suite.sh speed     # DML 2xResNet-32, MCL-OKD 4xResNet-32, ONE 4xResNet-32, DML 2xWRN-16-2,
#                                       # DML 2xResNet-110 at batch 128: reference loop vs engine configurations
#   bash scripts/gpu_suite.sh compile   # torch.compile configurations of DML 2xResNet-32 (slow first epoch)
#   bash scripts/gpu_suite.sh profile   # torch.profiler of the fastest DML 2xResNet-32 configuration
#
# Logs and JSON rows go to $OUT (default runs/gpu_suite). The engine needs tqdm and tensorboard, the check
# pytest: where the GPU machine lacks them, `pip install --target .gpu_deps tqdm tensorboard pytest` here
# and carry .gpu_deps; it is put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_suite}
mkdir -p "$out"
if [ -d .gpu_deps ]; then export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

bench() {  # bench NAME ARGS...: one table, its log and its JSON (a re-run of a part replaces both: --force)
    local name=$1; shift
    python scripts/benchmark.py "$@" --json "$out/$name.json" --force 2>&1 | grep -v -i warn | tee "$out/$name.log"
}

configs=default,grouped,bf16+channels_last,bf16+channels_last+grouped,cudagraph,grouped+cudagraph,bf16+channels_last+grouped+cudagraph
case "${1:-}" in
    check)
        python -m pytest tests/test_gpu.py -q -o addopts="" -p no:cacheprovider 2>&1 | tee "$out/check.log" ;;
    speed)
        bench dml-resnet32 --method dml --arch resnet32 --peers 2 --configs "$configs"
        bench mcl_okd-resnet32 --method mcl_okd --arch resnet32 --peers 4 --configs "$configs"
        bench one-resnet32 --method one --arch resnet32 --peers 4 --configs "$configs"
        bench dml-wrn_16_2 --method dml --arch wrn_16_2 --peers 2 --configs "$configs"
        bench dml-resnet110 --method dml --arch resnet110_bottleneck --peers 2 --configs "$configs" ;;
    compile)
        bench dml-resnet32-compile --method dml --arch resnet32 --peers 2 --skip-reference \
            --configs bf16+channels_last+grouped+compile,bf16+channels_last+grouped+compile-ro ;;
    profile)
        bench dml-resnet32-profile --method dml --arch resnet32 --peers 2 --skip-reference --steps 200 \
            --configs "${CONFIG:-bf16+channels_last+grouped+cudagraph}" --profile 50 ;;
    *)
        echo "usage: bash scripts/gpu_suite.sh check|speed|compile|profile" >&2; exit 2 ;;
esac
