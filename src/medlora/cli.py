"""`medlora` command line: prepare, inspect, train, eval, ask, build-tiny.

Every subcommand takes `--config FILE.yaml` plus flags named after the dataclass fields in
`medlora.config` (Hugging Face names for training: --output_dir, --max_steps, ...).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from medlora.config import (ConfigError, DataArguments, EvalArguments, LoraArguments, MedloraError,
                            ModelArguments, PrepareArguments, main_guard, parse_config, training_sections,
                            validate)

USAGE = """usage: medlora <command> [--config FILE.yaml] [--flag value ...]

commands:
  prepare     validate, clean, split and save MedMCQA data (Arrow) with statistics
  inspect     show tokenised training examples with the loss mask (debug view)
  train       LoRA fine-tuning (TRL SFTTrainer + PEFT); writes adapter/ and metrics.json
  eval        MedMCQA accuracy (lm-eval compatible); writes predictions.jsonl and summary.json
  ask         answer one question with the exact training prompt
  bench       time the real training loop per backend; JSON + Markdown + PNG in benchmarks/results
  bench-loss  time the LM head + cross-entropy alone per implementation (TRL, full logits, CCE, Liger)
  report      (re)write a run's model card, RUN_DIR/MODEL_CARD.md, from its metrics.json
  export      merge an adapter into the base and write a servable checkpoint in the hub's layout
  rehearse    the real recipe end to end (train, SIGTERM, resume, eval, export), every phase timed
  env         this machine's GPU, libraries and the kernel each backend will use (and why)
  setup-kernels  fetch (or take --from a file) the pinned Triton kernels of backend fast into the cache
  build-tiny  write the offline tiny Nemotron-H + tokenizer to a directory

`medlora <command> --help` lists the flags of a command."""


def _sections_help(argv: Sequence[str], sections, prog: str) -> None:
    if "-h" in argv or "--help" in argv:
        from transformers import HfArgumentParser

        HfArgumentParser(sections, prog=prog).print_help()
        sys.exit(0)


def cmd_train(argv: Sequence[str]) -> None:
    from medlora.backends import import_unsloth_first

    import_unsloth_first(list(argv))  # before transformers/TRL are imported, so Unsloth can patch them
    sections = training_sections()
    _sections_help(argv, sections, "medlora train")
    model, lora, data, run, train_args = parse_config(argv, sections, "medlora train")
    from medlora.train import train

    train(model, lora, data, run, train_args)


def cmd_eval(argv: Sequence[str]) -> None:
    sections = (ModelArguments, DataArguments, EvalArguments)
    _sections_help(argv, sections, "medlora eval")
    model_args, data_args, eval_args = parse_config(argv, sections, "medlora eval", training_sections())
    validate(model=model_args, data=data_args)
    from medlora.evaluate_cli import run_eval

    run_eval(model_args, data_args, eval_args)


def cmd_prepare(argv: Sequence[str]) -> None:
    sections = (ModelArguments, DataArguments, PrepareArguments)
    _sections_help(argv, sections, "medlora prepare")
    model_args, data_args, prep_args = parse_config(argv, sections, "medlora prepare", training_sections())
    validate(model=model_args, data=data_args)
    from medlora.prepare import prepare

    prepare(model_args, data_args, prep_args)


def cmd_inspect(argv: Sequence[str]) -> None:
    argv = list(argv)
    n = 3
    if "--num_examples" in argv:
        i = argv.index("--num_examples")
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--num_examples needs a positive integer, got {value or 'nothing'!r}")
        n = int(value)
        del argv[i : i + 2]
    sections = (ModelArguments, DataArguments)
    _sections_help(argv, sections, "medlora inspect")
    model_args, data_args = parse_config(argv, sections, "medlora inspect", training_sections())
    validate(model=model_args, data=data_args)
    from medlora.formatting import encode_example, render_example
    from medlora.model import checkpoint_zero_rows, load_tokenizer, resolve_model_path
    from medlora.train import describe_format, load_training_data, resolve_format

    tokenizer = load_tokenizer(model_args)
    options, fmt = resolve_format(data_args, tokenizer, checkpoint_zero_rows(resolve_model_path(model_args)))
    print("format:", describe_format(fmt))
    rows = load_training_data(data_args).train_rows
    for row in rows[:n]:
        example = encode_example(tokenizer, row, options)
        trained = sum(example["completion_mask"])
        print(f"--- {row['id']} ({row['source']}:{row['line']}): {len(example['input_ids'])} tokens, {trained} trained")
        print(render_example(tokenizer, example))
        print("trained ids:", [t for t, m in zip(example["input_ids"], example["completion_mask"]) if m])


def cmd_ask(argv: Sequence[str]) -> None:
    import argparse

    class AskParser(argparse.ArgumentParser):  # one "medlora: error:" line, like every other command
        def error(self, message):
            raise ConfigError(f"medlora ask: {message}")

    parser = AskParser(prog="medlora ask", add_help=False)
    parser.add_argument("question")
    parser.add_argument("--options", nargs=4, required=True, metavar=("A", "B", "C", "D"))
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        sys.exit(0)
    known, rest = parser.parse_known_args(argv)
    model_args, data_args = parse_config(rest, (ModelArguments, DataArguments), "medlora ask", training_sections())
    validate(model=model_args, data=data_args)
    import json

    from medlora.evaluate import answer
    from medlora.evaluate_cli import eval_format, load_for_eval

    from medlora.data import DataError, row_problem
    from medlora.formatting import OPTION_FIELDS

    row = {"question": known.question, **dict(zip(OPTION_FIELDS, known.options)), "id": "ask"}
    problem = row_problem(row, required=("question", *OPTION_FIELDS))
    if problem:
        raise DataError(f"medlora ask: field '{problem[0]}': {problem[1]}")
    model, tokenizer = load_for_eval(model_args, known.adapter)
    options, _ = eval_format(data_args, known.adapter, tokenizer, model)
    result = answer(model, tokenizer, row, options, known.max_new_tokens)
    print(result["prompt"])
    print(json.dumps({k: v for k, v in result.items() if k != "prompt"}, indent=2, ensure_ascii=False))


def cmd_bench(argv: Sequence[str]) -> None:
    from medlora.benchmark import BenchArguments, run_bench

    sections = (BenchArguments, LoraArguments)
    _sections_help(argv, sections, "medlora bench")
    bench_args, lora_args = parse_config(argv, sections, "medlora bench")
    validate(lora=lora_args)
    run_bench(bench_args, lora_args)


def cmd_bench_loss(argv: Sequence[str]) -> None:
    from medlora.loss_bench import LossBenchArguments, run_loss_bench

    _sections_help(argv, (LossBenchArguments,), "medlora bench-loss")
    (args,) = parse_config(argv, (LossBenchArguments,), "medlora bench-loss")
    run_loss_bench(args)


def cmd_report(argv: Sequence[str]) -> None:
    from medlora.modelcard import ReportArguments, write_model_card

    _sections_help(argv, (ReportArguments,), "medlora report")
    (args,) = parse_config(argv, (ReportArguments,), "medlora report")
    print(write_model_card(args.run_dir, args.output))


@dataclass
class EnvArguments:
    json: bool = field(default=False, metadata={"help": "print the report as JSON"})
    fast_gpu_arch: str = field(default="auto", metadata={"help": "as in train: auto, or sm80 (the A100 path)"})


@dataclass
class SetupKernelsArguments:
    source: str | None = field(default=None, metadata={
        "help": "a local copy of mamba_ssm-2.3.2.post1.tar.gz (checked against the pinned SHA-256) instead of PyPI",
        "aliases": ["--from"]})


def cmd_env(argv: Sequence[str]) -> None:
    _sections_help(argv, (EnvArguments,), "medlora env")
    (args,) = parse_config(argv, (EnvArguments,), "medlora env")
    from medlora.kernels import environment_report

    report = environment_report(args.fast_gpu_arch)
    if args.json:
        import json

        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = report["machine"]
    gpu = f"{m['gpu']} ({m['sm']}, {m['memory_gib']} GiB), CUDA {m['cuda_version']}" if m["cuda"] else "no CUDA GPU"
    console.print(f"[bold]machine[/] {gpu}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
                  f"trl {m['trl']}")
    for title, rows in (("kernel sources", report["kernel_sources"].items()),
                        *((f"backend {name}", info.items()) for name, info in report["backends"].items())):
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("part", style="bold")
        table.add_column("kernel / reason")
        for key, value in rows:
            if value is not None:
                table.add_row(str(key), str(value))
        console.print(table)


def cmd_setup_kernels(argv: Sequence[str]) -> None:
    _sections_help(argv, (SetupKernelsArguments,), "medlora setup-kernels")
    (args,) = parse_config(argv, (SetupKernelsArguments,), "medlora setup-kernels")
    from medlora.kernels import MAMBA_SSM_FILE, ensure_mamba_ssm

    folder = ensure_mamba_ssm(source=args.source)
    print(f"{MAMBA_SSM_FILE}: Triton kernels cached in {folder} (SHA-256 checked)")


def cmd_export(argv: Sequence[str]) -> None:
    from medlora.export import ExportArguments, export

    sections = (ModelArguments, ExportArguments)
    _sections_help(argv, sections, "medlora export")
    model_args, export_args = parse_config(argv, sections, "medlora export")
    validate(model=model_args)
    if "--model_name_or_path" not in argv:  # default: the base the adapter was trained on
        import json

        try:
            config = json.loads((Path(export_args.adapter) / "adapter_config.json").read_text(encoding="utf-8"))
            model_args.model_name_or_path = config.get("base_model_name_or_path") or model_args.model_name_or_path
        except (OSError, ValueError, AttributeError):
            pass  # export() names the problem with the adapter dir
    summary = export(model_args, export_args)
    check = summary["check"]
    print(f"wrote {export_args.output_dir}: {summary['tensors']} tensors in {len(summary['shards'])} file(s), "
          f"{summary['bytes'] / 2**30:.2f} GiB, {summary['dtype']}, layout "
          f"{'= base' if (summary['layout'] or {}).get('same_as_base') else 'not compared (no base files)'}; "
          + (f"reload check: bit-identical {check['reload_identical']}, logits relative L2 {check['rel_l2']:.2e}, "
             f"top-1 {check['top1_agreement']:.3f} (pass: {check['tolerance']})" if check else "reload check skipped"))


def cmd_rehearse(argv: Sequence[str]) -> None:
    from medlora.rehearsal import RehearsalArguments, run_rehearsal

    _sections_help(argv, (RehearsalArguments,), "medlora rehearse")
    (args,) = parse_config(argv, (RehearsalArguments,), "medlora rehearse")
    run_rehearsal(args)


def cmd_build_tiny(argv: Sequence[str]) -> None:
    out = argv[0] if argv else ModelArguments().tiny_cache_dir
    from medlora.model import build_tiny_model

    print(build_tiny_model(Path(out)))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "prepare": cmd_prepare, "inspect": cmd_inspect,
            "ask": cmd_ask, "bench": cmd_bench, "bench-loss": cmd_bench_loss, "report": cmd_report, "export": cmd_export, "rehearse": cmd_rehearse, "env": cmd_env,
            "setup-kernels": cmd_setup_kernels, "build-tiny": cmd_build_tiny}


@main_guard
def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command = COMMANDS.get(argv[0])
    if command is None:
        raise ConfigError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}")
    command(argv[1:])


__all__ = ["main", "MedloraError"]

if __name__ == "__main__":
    main()
