"""How long SDPA's first call at a new sequence length takes, per backend: is hf+triton's slow step (README,
phase profile-hftriton) cuDNN building something for a length it has not seen? Run on a GPU, from the root:

    uv run python benchmarks/sdpa_first_call.py --results_dir benchmarks/results

Each backend runs in a process of its own, so none inherits another's caches. The call is transformers'
NemotronH SDPA call on nano-quarter's bench batches: batch 16, 32 heads (the 2 KV heads repeated, as
transformers does when it passes a mask), head dim 128, bf16, a boolean causal + right-padding mask; forward
and backward, timed between two synchronisations. Lengths repeat, so a first call and a repeat both show; the
first length, 64, is each process's first call (library loads, handles)."""
import argparse
import json
import subprocess
import sys
import time
from datetime import date

LENGTHS = (64, 130, 146, 162, 178, 182, 194, 130, 194, 200, 208, 256, 200, 320, 256, 320)
BACKENDS = ("default", "cudnn", "efficient")  # flash takes no mask; math is the slow reference


def one_call(torch, length: int, batch: int, heads: int, head_dim: int) -> None:
    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    keep = torch.arange(length, device="cuda")[None, :] < (length - torch.arange(batch, device="cuda") * 3)[:, None]
    causal = torch.ones(length, length, device="cuda", dtype=torch.bool).tril()
    mask = causal[None, None] & keep[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()


def worker(backend: str, batch: int, heads: int, head_dim: int) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION]}
    calls, seen = [], set()
    for length in LENGTHS:
        q = torch.empty(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(batch, 1, length, length, device="cuda", dtype=torch.bool)
        pick = torch._fused_sdp_choice(q, q, q, mask)  # what default dispatch would take
        pick = next((b.name for b in SDPBackend.__members__.values() if int(b) == pick), pick)
        torch.cuda.synchronize()
        start = time.perf_counter()
        if backend == "default":
            one_call(torch, length, batch, heads, head_dim)
        else:
            with sdpa_kernel(chosen[backend]):
                one_call(torch, length, batch, heads, head_dim)
        torch.cuda.synchronize()
        calls.append({"length": length, "seconds": round(time.perf_counter() - start, 4),
                      "repeat": length in seen, "default_dispatch": pick})
        seen.add(length)
    return {"backend": backend, "calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results_dir", default="benchmarks/results",
                        help="where <date>-<gpu>-sdpa-first-call.json goes (an existing one is never overwritten)")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=128)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("sdpa_first_call.py measures CUDA attention backends: run it on a machine with an NVIDIA GPU")
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.heads, args.head_dim)))
        return
    from medlora import runinfo
    from medlora.outputs import write_atomic

    runs = []
    for backend in BACKENDS:
        proc = subprocess.run([sys.executable, __file__, "--worker", backend,
                               "--batch", str(args.batch), "--heads", str(args.heads), "--head_dim",
                               str(args.head_dim)], capture_output=True, text=True)
        runs.append(json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0
                    else {"backend": backend, "failed": True, "error": proc.stderr[-2000:]})
    out = {"date": date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "versions": runinfo.versions(),
           "config": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": "bfloat16",
                      "mask": "bool causal & right padding", "lengths": LENGTHS, "timed": "forward + backward"},
           "runs": runs}
    path = runinfo.new_result_path(args.results_dir, out["date"], out["gpu"], "sdpa-first-call")
    write_atomic(path, json.dumps(out, indent=2) + "\n")  # as the bench writes its JSON: never half-written
    print(f"wrote {path}")
    for run in runs:
        print(run["backend"], "failed" if run.get("failed") else
              " ".join(f"{c['length']}{'r' if c['repeat'] else ''}:{c['seconds']:.3f}" for c in run["calls"]))


if __name__ == "__main__":
    main()
