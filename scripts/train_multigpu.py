"""LoRA fine-tuning under torchrun: the same `medlora.train.train` as `medlora train`.

    # one GPU, or CPU
    uv run python scripts/train_multigpu.py --config configs/tiny.yaml --output_dir outputs/tiny-run
    # N GPUs of one machine (DDP, NCCL); on CPUs torchrun uses gloo
    nohup uv run torchrun --nproc_per_node=N scripts/train_multigpu.py --config configs/nano-ddp.yaml \
        > logs/nano-ddp.log 2>&1 &

Each rank reads RANK / LOCAL_RANK / WORLD_SIZE from torchrun, loads the model onto its own device
(cuda:LOCAL_RANK) and the Trainer wraps it in DistributedDataParallel. Only rank 0 prints and writes.
"""

from medlora.cli import cmd_train
from medlora.errors import main_guard


@main_guard
def main() -> None:
    import sys

    cmd_train(sys.argv[1:])


if __name__ == "__main__":
    main()
