#!/usr/bin/env bash
# The CUDA path checked and timed in one run, meant for a lent GPU (under 8 minutes on one H100):
#   1. the CUDA-marked tests (tests/test_cuda.py: training with and without AMP, evaluation against
#      the CPU, FMP's channel-batched ranking against the reference loop, a GPU record defended on the CPU);
#   2. BadNets on PreAct-ResNet18, the shipped YAML for $EPOCHS epochs (the paper's recipe, shortened);
#   3. FMP and FT on the record, each printing its before/after table;
#   4. FMP's ranking of every feature map of that record's model, reference loop against the fast path
#      at each chunk size in $CHUNKS, in NCHW and NHWC, with whether the flags are identical
#      (bench/fmp_rank.py), then both in float64 on the first 10 layers (the reference is slow
#      there), where only a real difference between the paths can remain;
#   5. training throughput of PreAct-ResNet18, this toolkit's pipeline against a BackdoorBench-style
#      one (PIL transforms, DataLoader workers), same batch size, same run, then the toolkit's loop
#      in channels-last, with cuDNN autotuning, compiled, as CUDA graphs and with a fused SGD
#      (bench/throughput.py).
#
# A GPU machine has no CIFAR-10 and no network: make a subset that travels (53 MB), here, once:
#     python bench/cifar_subset.py --out .gpu_data/cifar10 --train 15000 --test 3000
# then, on the GPU machine, from the repository root:
#     bash bench/gpu_check.sh .gpu_data/cifar10
# Each step's output goes to the screen and to $OUT/<step>.txt (default record/gpu_check); records
# to $RECORD (default /tmp/gpu_check_record). DEVICE, MODEL, IMAGES, EPOCHS, LAYERS and CHUNKS shrink the run
# for a look on a CPU (e.g. DEVICE=cpu MODEL=resnet20 IMAGES=512 EPOCHS=1 LAYERS=2 CHUNKS=1). Exit 1 if any step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
DATA=$(realpath "${1:-data}")
OUT=${OUT:-record/gpu_check}
RECORD=${RECORD:-/tmp/gpu_check_record}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-preactresnet18}
IMAGES=${IMAGES:-50000}
EPOCHS=${EPOCHS:-20}
LAYERS=${LAYERS:-}
CHUNKS=${CHUNKS:-32 128}
mkdir -p "$OUT" "$RECORD"
rm -f "$OUT"/{environment,cuda_tests,attack,throughput,fmp_rank,fmp_rank_float64,defenses}.txt
export PYTHONUNBUFFERED=1 CIFAR10_DIR="$DATA"
source bench/steps.sh

step environment 60 python3 -c "
import torch, torchvision
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'CUDA', torch.version.cuda)
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device visible')"
if [ "$DEVICE" != cpu ]; then
    step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
fi
step attack 120 python3 ./attack/badnet_attack.py --yaml_path ../config/attack/badnet/cifar10.yaml --dataset cifar10 \
    --dataset_path "$DATA" --save_folder_name badnet_gpu --model "$MODEL" --epochs "$EPOCHS" --record_root "$RECORD" \
    --device "$DEVICE" --overwrite
step defenses 120 bash -c "set -e
python3 ./defense/feature.py --yaml_path ./config/defense/feature/cifar10.yaml --dataset cifar10 --result_file badnet_gpu \
    --record_root '$RECORD' --device '$DEVICE' --overwrite
python3 ./defense/ft/ft.py --result_file badnet_gpu --yaml_path ./config/defense/ft/cifar10.yaml --dataset cifar10 \
    --record_root '$RECORD' --device '$DEVICE' --overwrite"
# ranked on the trained record: a model with random weights scores every map alike, which proves nothing
step fmp_rank 150 python3 bench/fmp_rank.py --result_file badnet_gpu --record_root "$RECORD" --device "$DEVICE" \
    --channel_chunk $CHUNKS --channels_last false true ${LAYERS:+--layers "$LAYERS"}
# the same comparison in float64: scores that still differ there differ for a reason other than rounding
step fmp_rank_float64 150 python3 bench/fmp_rank.py --result_file badnet_gpu --record_root "$RECORD" --device "$DEVICE" \
    --channel_chunk 32 --channels_last false true --float64 true --layers "${LAYERS:-10}"
# last: its torch.compile variant is the slowest to set up, and a time limit then cuts only that
step throughput 200 python3 bench/throughput.py --model "$MODEL" --device "$DEVICE" --images "$IMAGES" \
    --batch_size 128 --workers 4 --dataset_path "$DATA"

finish
