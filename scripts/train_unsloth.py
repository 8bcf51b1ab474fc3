"""LoRA fine-tuning with the Unsloth backend, single GPU or torchrun DDP: `medlora.train.train`.

    uv sync --extra unsloth
    uv run python scripts/train_unsloth.py --config configs/nano-bf16.yaml
    nohup uv run torchrun --nproc_per_node=N scripts/train_unsloth.py --config configs/nano-ddp.yaml \
        > logs/nano-unsloth.log 2>&1 &

Identical to scripts/train_multigpu.py except that `--backend unsloth` is forced and Unsloth is
imported before transformers/TRL/PEFT so its patches apply. Each rank loads onto cuda:LOCAL_RANK.
Without an NVIDIA GPU it stops with one sentence (Unsloth imports only with CUDA).
"""

import sys

from medlora.cli import cmd_train
from medlora.errors import main_guard


@main_guard
def main() -> None:
    cmd_train([*sys.argv[1:], "--backend", "unsloth"])


if __name__ == "__main__":
    main()
