#!/usr/bin/env bash
# The FMP paper's CIFAR-10 setting (Huang & Bu, ICLR 2024, Table 1), timed end to end on one GPU:
#   1. BadNets on PreAct-ResNet18 by the shipped YAML (BackdoorBench's recipe: 100 epochs, SGD 0.01,
#      cosine, batch 128), every step compiled and replayed as CUDA graphs (--compile $COMPILE);
#      the step's time is the recipe's wall time, evaluation each epoch included;
#   2. FMP (released settings), its random-selection control at FMP's counts, and FT on the record,
#      each printing its before/after table, in the eager loop (a few thousand images: compiling
#      would cost more than it saves).
# Needs all of CIFAR-10 under DATA/cifar-10-batches-py. A lent GPU takes 64 MiB a call: pack it with
# bench/cifar_pack.py here, carry the parts in two calls, unpack there. Then, from the repository root:
#     bash bench/gpu_paper_recipe.sh .gpu_full/cifar10
# Output in $OUT/<step>.txt (default record/gpu_paper_recipe); records in $RECORD (default
# /tmp/gpu_paper_record). EPOCHS, MODEL and DEVICE shorten it for a look on a CPU, e.g.
#     DEVICE=cpu MODEL=resnet20 EPOCHS=1 COMPILE=none bash bench/gpu_paper_recipe.sh data
# Exit 1 if any step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
DATA=$(realpath "${1:-data}")
OUT=${OUT:-record/gpu_paper_recipe}
RECORD=${RECORD:-/tmp/gpu_paper_record}
DEVICE=${DEVICE:-cuda}
COMPILE=${COMPILE:-reduce-overhead}
EPOCHS=${EPOCHS:-}
MODEL=${MODEL:-}
ATTACK_LIMIT=${ATTACK_LIMIT:-600}
mkdir -p "$OUT" "$RECORD"
export PYTHONUNBUFFERED=1
source bench/steps.sh
common=(--dataset cifar10 --result_file badnet_paper --record_root "$RECORD" --device "$DEVICE" --overwrite)

step attack "$ATTACK_LIMIT" python3 ./attack/badnet_attack.py --yaml_path ../config/attack/badnet/cifar10.yaml \
    --dataset cifar10 --dataset_path "$DATA" --save_folder_name badnet_paper --record_root "$RECORD" \
    --device "$DEVICE" --compile "$COMPILE" --overwrite ${EPOCHS:+--epochs "$EPOCHS"} ${MODEL:+--model "$MODEL"}
step fmp 120 python3 ./defense/feature.py --yaml_path ./config/defense/feature/cifar10.yaml "${common[@]}"
step fmp_random 120 python3 ./defense/feature.py --yaml_path ./config/defense/feature/cifar10.yaml "${common[@]}" \
    --select random --save_folder_name feature_random
step ft 120 python3 ./defense/ft/ft.py --yaml_path ./config/defense/ft/cifar10.yaml "${common[@]}"
finish
