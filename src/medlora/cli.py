"""`medlora` command line: one table of commands, each parsed through the same dataclass machinery.

Every command takes `--config FILE.yaml` plus flags named after the fields of its dataclasses (Hugging Face
names for training: --output_dir, --max_steps, ...); each dataclass validates its own fields. A leading
positional argument is accepted where a command has one (`ask QUESTION`, `build-tiny DIR`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from medlora.config import (DataArguments, EvalArguments, LoraArguments, ModelArguments, PrepareArguments, need,
                            need_count, need_text, parse_config, training_sections, validate)
from medlora.errors import ConfigError, MedloraError, main_guard, shown

# ---------------------------------------------------------------- the commands' own arguments


@dataclass
class AskArguments:
    question: str = field(metadata={"help": "the question (also accepted as the first, positional argument)"})
    options: list[str] = field(default_factory=list, metadata={"help": "the four options A B C D"})
    adapter: str | None = field(default=None, metadata={"help": "adapter dir; omit to ask the base model"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens generated after the prompt"})

    def validate(self) -> None:
        need(len(self.options) == 4, f"--options: expected 4 arguments (A B C D), got {len(self.options)}")
        need(self.max_new_tokens >= 1, f"--max_new_tokens must be positive, got {self.max_new_tokens}")
        need_count(self.max_new_tokens, "--max_new_tokens", 1, 8192)
        need_text(self.adapter, "--adapter", optional=True)


@dataclass
class InspectArguments:
    num_examples: int = field(default=3, metadata={"help": "training examples to show"})

    def validate(self) -> None:
        need(self.num_examples >= 1, f"--num_examples needs a positive integer, got {self.num_examples}")
        need_count(self.num_examples, "--num_examples", 1, 10**6)


@dataclass
class BuildTinyArguments:
    output_dir: str = field(default=ModelArguments().tiny_cache_dir, metadata={
        "help": "where the tiny model goes (also accepted as the first, positional argument)"})

    def validate(self) -> None:
        need_text(self.output_dir, "--output_dir")


@dataclass
class EnvArguments:
    json: bool = field(default=False, metadata={"help": "print the report as JSON"})
    fast_gpu_arch: str = field(default="auto", metadata={"help": "as in train: auto, or sm80 (the A100 path)"})

    def validate(self) -> None:
        need(self.fast_gpu_arch in ("auto", "sm80"), f"--fast_gpu_arch must be auto or sm80, got {shown(self.fast_gpu_arch)}")


@dataclass
class SetupKernelsArguments:
    source: str | None = field(default=None, metadata={
        "help": "a local copy of mamba_ssm-2.3.2.post1.tar.gz (checked against the pinned SHA-256) instead of PyPI",
        "aliases": ["--from"]})

    def validate(self) -> None:
        need_text(self.source, "--from", optional=True)


# ---------------------------------------------------------------- what each command does


def run_train(argv, model, lora, data, run, train_args) -> None:
    from medlora.train import train

    train(model, lora, data, run, train_args)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # every rank finished: close the group before exit, so no
        dist.barrier()  # communication thread is still alive when the interpreter tears down (an abort, -6)
        dist.destroy_process_group()


def run_eval(argv, model_args, data_args, eval_args) -> None:
    from medlora.evaluate_cli import run_eval as evaluate

    evaluate(model_args, data_args, eval_args)


def run_prepare(argv, model_args, data_args, prep_args) -> None:
    from medlora.prepare import prepare

    prepare(model_args, data_args, prep_args)


def run_inspect(argv, model_args, data_args, args: InspectArguments) -> None:
    from medlora.data import describe_format, load_training_data, resolve_format
    from medlora.formatting import encode_example, render_example
    from medlora.model import checkpoint_zero_rows, load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(model_args)
    options, fmt = resolve_format(data_args, tokenizer, checkpoint_zero_rows(resolve_model_path(model_args)))
    print("format:", describe_format(fmt))
    for row in load_training_data(data_args).train_rows[:args.num_examples]:
        example = encode_example(tokenizer, row, options)
        trained = sum(example["completion_mask"])
        print(f"--- {row['id']} ({row['source']}:{row['line']}): {len(example['input_ids'])} tokens, {trained} trained")
        print(render_example(tokenizer, example))
        print("trained ids:", [t for t, m in zip(example["input_ids"], example["completion_mask"]) if m])


def run_ask(argv, model_args, data_args, args: AskArguments) -> None:
    from medlora.data import DataError, row_problem
    from medlora.evaluate import answer, eval_format, load_for_eval
    from medlora.formatting import OPTION_FIELDS

    row = {"question": args.question, **dict(zip(OPTION_FIELDS, args.options)), "id": "ask"}
    problem = row_problem(row, required=("question", *OPTION_FIELDS))
    if problem:
        raise DataError(f"medlora ask: field '{problem[0]}': {problem[1]}")
    model, tokenizer = load_for_eval(model_args, args.adapter)
    options, _ = eval_format(data_args, args.adapter, tokenizer, model)
    result = answer(model, tokenizer, row, options, args.max_new_tokens)
    print(result["prompt"])
    print(json.dumps({k: v for k, v in result.items() if k != "prompt"}, indent=2, ensure_ascii=False))


def run_bench(argv, bench_args, lora_args) -> None:
    from medlora.benchmark import run_bench as bench

    bench(bench_args, lora_args)


def run_bench_loss(argv, args) -> None:
    from medlora.loss_bench import run_loss_bench

    run_loss_bench(args)


def run_report(argv, args) -> None:
    from medlora.modelcard import write_model_card

    print(write_model_card(args.run_dir, args.output))


def run_export(argv, model_args, export_args) -> None:
    from medlora.export import export

    from medlora.evaluate import read_adapter

    export_args.validate()
    config = read_adapter(export_args.adapter)
    if "--model_name_or_path" not in argv:  # default: the base the adapter was trained on
        model_args.model_name_or_path = config.get("base_model_name_or_path") or model_args.model_name_or_path
    summary = export(model_args, export_args)
    check = summary["check"]
    print(f"wrote {export_args.output_dir}: {summary['tensors']} tensors in {len(summary['shards'])} file(s), "
          f"{summary['bytes'] / 2**30:.2f} GiB, {summary['dtype']}, layout "
          f"{'= base' if (summary['layout'] or {}).get('same_as_base') else 'not compared (no base files)'}; "
          + (f"reload check: bit-identical {check['reload_identical']}, logits relative L2 {check['rel_l2']:.2e}, "
             f"top-1 {check['top1_agreement']:.3f} (pass: {check['tolerance']})" if check else "reload check skipped"))


def run_rehearse(argv, args) -> None:
    from medlora.rehearsal import run_rehearsal

    run_rehearsal(args)


def run_env(argv, args: EnvArguments) -> None:
    from medlora.fast import DEFAULT_LEVERS
    from medlora.kernels import environment_report

    report = environment_report(DEFAULT_LEVERS, args.fast_gpu_arch)
    if args.json:
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


def run_sweep(argv, args) -> None:
    from medlora.sweep import run_sweep as sweep

    sweep(args)


def run_setup_kernels(argv, args: SetupKernelsArguments) -> None:
    from medlora.kernels import MAMBA_SSM_FILE, ensure_mamba_ssm

    folder = ensure_mamba_ssm(source=args.source)
    print(f"{MAMBA_SSM_FILE}: Triton kernels cached in {folder} (SHA-256 checked)")


def run_build_tiny(argv, args: BuildTinyArguments) -> None:
    from medlora.model import build_tiny_model

    print(build_tiny_model(Path(args.output_dir)))


# ---------------------------------------------------------------- the table


def _bench_sections():
    from medlora.benchmark import BenchArguments

    return (BenchArguments, LoraArguments)


def _one(module: str, name: str) -> Callable[[], tuple]:
    def sections():
        import importlib

        return (getattr(importlib.import_module(module), name),)

    return sections


def _import_unsloth_first(argv: list[str]) -> None:
    from medlora.backends import import_unsloth_first

    import_unsloth_first(argv)  # before transformers/TRL are imported, so Unsloth can patch them


@dataclass(frozen=True)
class Command:
    help: str
    sections: Callable[[], tuple]  # the dataclasses it parses (called late: some live in heavy modules)
    run: Callable[..., Any]  # run(argv, *parsed sections)
    reads_training_configs: bool = False  # accepts (and ignores) the keys of a training YAML
    positional: str | None = None  # a leading positional argument is this flag
    config_flag: str | None = None  # `--config FILE` is this command's own flag (sweep: the trials' config)
    before: Callable[[list[str]], None] | None = None  # runs before anything imports transformers


COMMANDS: dict[str, Command] = {
    "train": Command("LoRA fine-tuning (TRL SFTTrainer + PEFT); writes adapter/ and metrics.json",
                     training_sections, run_train, before=_import_unsloth_first),
    "eval": Command("MedMCQA accuracy (lm-eval compatible); writes predictions.jsonl and summary.json",
                    lambda: (ModelArguments, DataArguments, EvalArguments), run_eval, True),
    "prepare": Command("validate, clean, split and save MedMCQA data (Arrow) with statistics",
                       lambda: (ModelArguments, DataArguments, PrepareArguments), run_prepare, True),
    "inspect": Command("show tokenised training examples with the loss mask (debug view)",
                       lambda: (ModelArguments, DataArguments, InspectArguments), run_inspect, True),
    "ask": Command("answer one question with the exact training prompt",
                   lambda: (ModelArguments, DataArguments, AskArguments), run_ask, True, positional="question"),
    "bench": Command("time the real training loop per backend; JSON + Markdown + PNG in benchmarks/results",
                     _bench_sections, run_bench),
    "bench-loss": Command("time the LM head + cross-entropy alone per implementation (TRL, full logits, CCE, Liger)",
                          _one("medlora.loss_bench", "LossBenchArguments"), run_bench_loss),
    "report": Command("(re)write a run's model card, RUN_DIR/MODEL_CARD.md, from its metrics.json",
                      _one("medlora.modelcard", "ReportArguments"), run_report),
    "export": Command("merge an adapter into the base and write a servable checkpoint in the hub's layout",
                      lambda: (ModelArguments, _one("medlora.export", "ExportArguments")()[0]), run_export),
    "rehearse": Command("the real recipe end to end (train, SIGTERM, resume, eval, export), every phase timed",
                        _one("medlora.rehearsal", "RehearsalArguments"), run_rehearse),
    "sweep": Command("search LoRA / optimiser settings with Optuna (TPE, pruning on eval accuracy); each trial a run",
                     _one("medlora.sweep", "SweepArguments"), run_sweep, config_flag="--train_config"),
    "env": Command("this machine's GPU, libraries and the kernel each backend will use (and why)",
                   lambda: (EnvArguments,), run_env),
    "setup-kernels": Command("fetch (or take --from a file) the pinned Triton kernels of backend fast into the cache",
                             lambda: (SetupKernelsArguments,), run_setup_kernels),
    "build-tiny": Command("write the offline tiny Nemotron-H + tokenizer to a directory",
                          lambda: (BuildTinyArguments,), run_build_tiny, positional="output_dir"),
}

USAGE = ("usage: medlora <command> [--config FILE.yaml] [--flag value ...]\n\ncommands:\n"
         + "".join(f"  {name:<13} {command.help}\n" for name, command in COMMANDS.items())
         + "\n`medlora <command> --help` lists the flags of a command.")


def print_help(sections, prog: str) -> None:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(sections, prog=prog)
    for action in parser._actions:  # argparse %-formats help texts: a literal % ("95% interval") must be doubled
        if action.help and "%" in action.help and "%(" not in action.help:
            action.help = action.help.replace("%", "%%")
    parser.print_help()


def run_command(name: str, argv: Sequence[str]) -> None:
    command = COMMANDS[name]
    argv = list(argv)
    if command.positional and argv and not argv[0].startswith("-"):
        argv = [f"--{command.positional}", argv[0], *argv[1:]]
    if command.config_flag:
        argv = [command.config_flag if a == "--config" else
                a.replace("--config=", command.config_flag + "=", 1) if a.startswith("--config=") else a for a in argv]
    if command.before is not None:
        command.before(argv)
    sections = command.sections()
    if "-h" in argv or "--help" in argv:
        print_help(sections, f"medlora {name}")
        sys.exit(0)
    parsed = parse_config(argv, sections, f"medlora {name}", training_sections() if command.reads_training_configs
                          else ())
    if name != "train":  # train() validates its sections together (their cross-checks need all of them)
        for section in parsed:
            if hasattr(section, "validate"):
                section.validate()
    command.run(argv, *parsed)


def cmd_train(argv: Sequence[str]) -> None:
    """`medlora train` (the torchrun scripts call it directly)."""
    run_command("train", argv)


@main_guard
def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        raise ConfigError(f"unknown command {shown(argv[0])}; commands: {', '.join(COMMANDS)}"
                          + (f" (did you mean {shown(close[0])}?)" if close else ""))
    run_command(argv[0], argv[1:])


__all__ = ["main", "MedloraError", "validate"]

if __name__ == "__main__":
    main()
