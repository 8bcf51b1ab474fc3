#!/usr/bin/env bash
# The bench runs behind README's nano-full and nano-quarter tables, one phase per argument:
#
#   bash benchmarks/nano-full-h200.sh fast baselines      # on one 141 GB GPU, from the project root
#
# Phases: fast (the headline row, 2 rounds x 20 steps), ab (fast against fast[-stream_padding]), levers (the
# defaults less one lever each), baselines (unsloth and hf+triton on a model saved to /dev/shm, ~63 GB of RAM),
# quarter (nano-quarter, every backend), gpu-tests (the GPU equivalence tests; their measured errors go to
# RESULTS/gpu-tests-DATE.jsonl). Each bench phase is one `medlora bench` run, so its rows compare within it.
# MEDLORA: how to call the CLI (default `uv run medlora`); PYTEST: how to call pytest (default `uv run pytest`);
# DATA: MedMCQA JSON lines (default the shared dev split); RESULTS: where the JSON, .md and .png go.
set -euo pipefail
MEDLORA=${MEDLORA:-uv run medlora}
PYTEST=${PYTEST:-uv run pytest}
DATA=${DATA:-../shared/data/medmcqa/dev.jsonl}
RESULTS=${RESULTS:-benchmarks/results}
SHM=${SHM:-/dev/shm/bench-models}  # a saved copy for the loaders that read one (hf, unsloth)
bench() { $MEDLORA bench --data_path "$DATA" --results_dir "$RESULTS" "$@"; }

for phase in "$@"; do
  echo "== $phase $(date -u +%FT%TZ)"
  case $phase in
    fast) bench --model_spec nano-full --in_memory true --backends fast --per_device_train_batch_size 176 \
            --rounds 2 --bench_steps 20 --bench_warmup_steps 3 --tag fast-b176 ;;
    ab) bench --model_spec nano-full --in_memory true --backends fast 'fast[-stream_padding]' \
          --per_device_train_batch_size 176 --rounds 2 --bench_steps 10 --bench_warmup_steps 3 --tag ab-b176 ;;
    levers) bench --model_spec nano-full --in_memory true --per_device_train_batch_size 176 --rounds 1 \
              --bench_steps 8 --bench_warmup_steps 3 --tag levers-b176 --backends fast 'fast[-fused_moe]' \
              'fast[-grouped_lora_moe]' 'fast[-triton_mamba]' 'fast[-triton_norms]' 'fast[-varlen_attention]' ;;
    baselines) bench --model_spec nano-full --model_cache_dir "$SHM" --backends unsloth hf+triton \
                 --per_device_train_batch_size 16 --rounds 1 --bench_steps 8 --bench_warmup_steps 2 \
                 --tag unsloth-hftriton ;;
    quarter) bench --model_spec nano-quarter --model_cache_dir "$SHM" --backends fast hf+triton unsloth hf \
               --per_device_train_batch_size 16 --backend_batch_size fast=256 --rounds 1 --bench_steps 8 \
               --bench_warmup_steps 3 --tag quarter ;;
    gpu-tests) mkdir -p "$RESULTS"
               MEDLORA_GPU_REPORT="$RESULTS/gpu-tests-$(date -u +%F).jsonl" $PYTEST -v -p no:cacheprovider \
                 --durations=0 tests/test_gpu_fast.py 'tests/test_gpu.py::test_tiny_train_and_eval_bf16[fast-True]' ;;
    *) echo "unknown phase $phase (fast ab levers baselines quarter gpu-tests)" >&2; exit 2 ;;
  esac
done
