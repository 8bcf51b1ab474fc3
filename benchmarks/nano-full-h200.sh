#!/usr/bin/env bash
# The bench runs behind README's nano-full and nano-quarter tables, one phase per argument:
#
#   bash benchmarks/nano-full-h200.sh fast baselines      # on one 141 GB GPU, from the project root
#
# Phases: fast (the headline row, 2 rounds x 20 steps); ab (fast against fast[-stream_padding]); levers and
# levers-moe (the defaults less one lever each, two runs that each fit one 10-minute GPU job); opt-in (the defaults
# and one opt-in lever: offload_checkpoints, compile_blocks); compile-blocks (fast[+compile_blocks] alone, 12 steps:
# its per-step record of recompiles and slow steps; with Stream.derive_for 225 s after two other phases, 2026-12-03);
# checkpointing (which block kinds are recomputed: all, moe, mamba, none; one run per setting, batch 64); baselines
# (unsloth and hf+triton on a model saved to /dev/shm, ~63 GB of RAM; on a fresh machine it had built, saved and
# loaded the model and not yet finished Unsloth's steps after 440 s, 2026-12-03); baselines-cudnn-off (the same
# with SDPA's cuDNN backend off in both: Unsloth's best setting); quarter (nano-quarter, every
# backend; it outran one 10-minute GPU job on 2026-12-03, README says how it was split); grouped-lora-quarter (the
# grouped-LoRA MoE against PEFT's W + BA on nano-quarter, built on the GPU); profile-hftriton (a profile of
# hf+triton's slow step on nano-quarter); sdpa-first-call (SDPA's first forward + backward at each new length, per
# backend: benchmarks/sdpa_first_call.py); sdpa-cudnn-quarter (hf+triton on nano-quarter with SDPA's cuDNN backend on,
# then off: two runs, since the switch is process-wide) and sdpa-cudnn-full (the same on nano-full, off first; off is
# what the bench and train now run for hf and hf+triton unless --sdpa_cudnn says); gpu-tests (the Triton kernel tests,
# ~5 min on a fresh machine, the opt-in lever cases, ~2.5 min for offload_checkpoints and ~3 min for compile_blocks,
# and the tiny 4-bit train, ~2 min; 2026-12-03) and gpu-tests-nano (fast against hf on nano-quarter, 4-7 min): the GPU
# equivalence tests, their measured errors appended to RESULTS/gpu-tests-DATE.jsonl.
# Each bench phase but checkpointing is one `medlora bench` run, so its rows compare within it.
# MEDLORA: how to call the CLI (default `uv run medlora`); PYTEST: how to call pytest (default `uv run pytest`);
# PYTHON: how to run a script (default `uv run python`);
# DATA: MedMCQA JSON lines (default the shared dev split); RESULTS: where the JSON, .md and .png go.
set -euo pipefail
MEDLORA=${MEDLORA:-uv run medlora}
PYTEST=${PYTEST:-uv run pytest}
PYTHON=${PYTHON:-uv run python}
DATA=${DATA:-../shared/data/medmcqa/dev.jsonl}
RESULTS=${RESULTS:-benchmarks/results}
SHM=${SHM:-/dev/shm/bench-models}  # a saved copy for the loaders that read one (hf, unsloth)
bench() { $MEDLORA bench --data_path "$DATA" --results_dir "$RESULTS" "$@"; }
# nano-full built on the GPU in every worker, 3 warm-up steps: what the fast rows share, so they compare
in_memory() { bench --model_spec nano-full --in_memory true --bench_warmup_steps 3 "$@"; }
gpu_tests() {
  mkdir -p "$RESULTS"
  MEDLORA_GPU_REPORT="$RESULTS/gpu-tests-$(date -u +%F).jsonl" $PYTEST -v -p no:cacheprovider --durations=0 "$@"
}
KERNEL_TESTS=(tests/test_gpu_fast.py::test_triton_conv_and_ssd_match_the_references_across_sequence_boundaries
              tests/test_gpu_fast.py::test_triton_norms_match_the_references
              tests/test_gpu_fast.py::test_triton_moe_kernels_match_the_references
              tests/test_gpu_fast.py::test_opt_in_levers_keep_every_gradient_on_the_tiny_model)

for phase in "$@"; do
  echo "== $phase $(date -u +%FT%TZ)"
  case $phase in
    fast) in_memory --per_device_train_batch_size 176 --rounds 2 --bench_steps 20 --tag fast-b176 --backends fast ;;
    ab) in_memory --per_device_train_batch_size 176 --rounds 2 --bench_steps 10 --tag ab-b176 \
          --backends fast 'fast[-stream_padding]' ;;
    levers) in_memory --per_device_train_batch_size 176 --rounds 1 --bench_steps 8 --tag levers-b176 \
              --backends fast 'fast[-triton_norms]' 'fast[-varlen_attention]' 'fast[-stream_padding]' ;;
    levers-moe) in_memory --per_device_train_batch_size 176 --rounds 1 --bench_steps 8 --tag levers-moe-b176 \
                  --backends fast 'fast[-fused_moe]' 'fast[-grouped_lora_moe]' 'fast[-triton_mamba]' ;;
    opt-in) in_memory --per_device_train_batch_size 176 --rounds 1 --bench_steps 8 --tag opt-in-b176 \
              --backends fast 'fast[+offload_checkpoints]' 'fast[+compile_blocks]' ;;
    compile-blocks)  # TORCH_LOGS=recompiles: dynamo prints the guard that failed for each recompile
      TORCH_LOGS=${TORCH_LOGS:-recompiles} in_memory --per_device_train_batch_size 176 --rounds 1 --bench_steps 12 \
        --tag compile-blocks-b176 --backends 'fast[+compile_blocks]' ;;
    checkpointing)  # one run per setting: a backend takes one checkpointing setting per run
      for blocks in true moe mamba false; do
        in_memory --per_device_train_batch_size 64 --rounds 1 --bench_steps 8 --tag "checkpointing-$blocks-b64" \
          --backends fast --backend_gradient_checkpointing "fast=$blocks" \
          || echo "checkpointing $blocks: bench exited $? (out of memory?)" >&2
      done ;;
    baselines) bench --model_spec nano-full --model_cache_dir "$SHM" --backends unsloth hf+triton \
                 --per_device_train_batch_size 16 --rounds 1 --bench_steps 8 --bench_warmup_steps 2 \
                 --tag unsloth-hftriton ;;
    baselines-cudnn-off)  # the same two with SDPA's cuDNN backend off in both (unsloth's default leaves it on)
      bench --model_spec nano-full --model_cache_dir "$SHM" --backends unsloth hf+triton \
        --per_device_train_batch_size 16 --rounds 1 --bench_steps 8 --bench_warmup_steps 2 --sdpa_cudnn false \
        --tag unsloth-hftriton-sdpa-cudnn-false ;;
    quarter) bench --model_spec nano-quarter --model_cache_dir "$SHM" --backends fast hf+triton unsloth hf \
               --per_device_train_batch_size 16 --backend_batch_size fast=256 --rounds 1 --bench_steps 8 \
               --bench_warmup_steps 3 --tag quarter ;;
    grouped-lora-quarter) bench --model_spec nano-quarter --in_memory true --bench_warmup_steps 3 \
                            --per_device_train_batch_size 256 --rounds 1 --bench_steps 8 --tag grouped-lora-quarter \
                            --backends fast 'fast[-grouped_lora_moe]' ;;
    profile-hftriton)  # inside hf+triton's slow step: the 2nd timed step, the batch with 3,104 padded tokens
      bench --model_spec nano-quarter --model_cache_dir "$SHM" --backends hf+triton --per_device_train_batch_size 16 \
        --rounds 1 --bench_steps 8 --bench_warmup_steps 3 --profile true --profile_step 2 --tag profile-hftriton ;;
    sdpa-first-call) $PYTHON benchmarks/sdpa_first_call.py --results_dir "$RESULTS" ;;
    sdpa-cudnn-quarter)  # hf+triton's slow step with and without cuDNN attention; the model built on the GPU
      for cudnn in true false; do
        bench --model_spec nano-quarter --in_memory true --backends hf+triton --per_device_train_batch_size 16 \
          --rounds 1 --bench_steps 8 --bench_warmup_steps 3 --sdpa_cudnn $cudnn --tag "sdpa-cudnn-$cudnn"
      done ;;
    sdpa-cudnn-full)  # the same on nano-full (built on the GPU, 67 GiB): ~70 s and ~90 s, 2026-12-03
      for cudnn in false true; do
        bench --model_spec nano-full --in_memory true --backends hf+triton --per_device_train_batch_size 16 \
          --rounds 1 --bench_steps 8 --bench_warmup_steps 2 --sdpa_cudnn $cudnn --tag "hftriton-sdpa-cudnn-$cudnn"
      done ;;
    gpu-tests) gpu_tests "${KERNEL_TESTS[@]}" 'tests/test_gpu.py::test_tiny_train_and_eval_bf16[fast-True]' ;;
    gpu-tests-nano) gpu_tests tests/test_gpu_fast.py -k nano_quarter ;;
    *) echo "unknown phase $phase (fast ab levers levers-moe opt-in compile-blocks checkpointing baselines" \
            "baselines-cudnn-off" \
            "quarter grouped-lora-quarter profile-hftriton sdpa-first-call sdpa-cudnn-quarter sdpa-cudnn-full" \
            "gpu-tests gpu-tests-nano)" >&2; exit 2 ;;
  esac
done
