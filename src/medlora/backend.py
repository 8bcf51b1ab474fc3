"""The training backend as one small typed object, parsed once (`Backend.parse`, `Backend.from_run`).

Loaders (`medlora.backends`), the bench and validation ask it questions — `is_fast`, `checkpoints_itself`,
`supports_fsdp2` — instead of comparing strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from medlora.errors import ConfigError, shown

NAMES = ("hf", "unsloth", "fast")  # what `--backend` takes; the bench also takes hf+triton and fast[...]@sm80


@dataclass(frozen=True)
class Backend:
    """A training backend, parsed once: `hf`, `unsloth`, `fast`, `fast[lever+lever]`, `fast[-lever]`, `fast[+lever]`,
    `fast@sm80`, `hf+triton`.

    Loaders, the bench and validation ask it questions (`is_fast`, `checkpoints_itself`, ...) rather than compare
    strings.
    """

    name: str  # hf, unsloth or fast
    levers: tuple[str, ...] = ()  # fast: the kernels on (the rest run exact PyTorch references)
    gpu_arch: str = "auto"  # fast: sm80 picks the A100 kernels on any GPU (medlora.kernels.plan_fast)
    triton_mamba_ops: bool = False  # hf+triton: hf with the Triton Mamba2 ops patched into transformers' mixer
    nf4_experts: bool = False  # bench fast+nf4: the 4-bit base of --load_in_4bit (experts and linear layers, NF4)

    @classmethod
    def parse(cls, spec: str, option: str = "--backends") -> "Backend":
        from medlora.fast import DEFAULT_LEVERS, LEVERS

        text, _, arch = spec.partition("@")
        arch = arch or "auto"
        if arch not in ("auto", "sm80"):
            raise ConfigError(f"{option} {spec}: the architecture suffix must be @sm80")
        if text.endswith("+nf4"):  # fast+nf4, fast[...]+nf4: the 4-bit experts of --load_in_4bit
            inner = cls.parse(text[:-4] + (f"@{arch}" if arch != "auto" else ""), option)
            if not inner.is_fast or inner.nf4_experts:
                raise ConfigError(f"{option} {spec}: +nf4 (4-bit routed experts), once, is for fast backends only")
            return cls("fast", inner.levers, inner.gpu_arch, nf4_experts=True)
        if text in ("hf", "unsloth", "hf+triton"):
            if arch != "auto":
                raise ConfigError(f"{option} {spec}: an architecture suffix is for fast backends only")
            return cls("hf" if text == "hf+triton" else text, triton_mamba_ops=text == "hf+triton")
        if text == "fast":  # what `medlora train --backend fast` runs (before 2026-12-01 the bench meant every lever)
            return cls("fast", tuple(DEFAULT_LEVERS), arch)
        if text.startswith("fast[") and text.endswith("]"):
            inner = text[5:-1]
            if inner.startswith("-"):  # fast[-compile-...]: the default levers without these (a lever table's rows)
                off = tuple(inner[1:].split("-"))
                levers = tuple(lever for lever in DEFAULT_LEVERS if lever not in off)
                unknown = set(off) - set(LEVERS)
            elif inner.startswith("+"):  # fast[+compile_blocks+...]: the default levers and these opt-in ones
                on = tuple(inner[1:].split("+"))
                levers = tuple(DEFAULT_LEVERS) + tuple(lever for lever in on if lever not in DEFAULT_LEVERS)
                unknown = set(on) - set(LEVERS)
            else:
                levers = () if inner in ("", "none") else tuple(inner.split("+"))
                unknown = set(levers) - set(LEVERS)
            if unknown:
                raise ConfigError(f"{option} {spec}: unknown levers {sorted(unknown)}; choose from {LEVERS}")
            return cls("fast", levers, arch)
        raise ConfigError(f"{option}: unknown backend {shown(spec)} (hf, unsloth, fast, fast[lever+...], fast[-lever], "
                          "fast[+lever], fast@sm80, fast+nf4, hf+triton)")

    @classmethod
    def from_run(cls, run) -> "Backend":
        """The backend of `medlora train`'s RunArguments (--backend, --fast_levers, --fast_gpu_arch)."""
        if run.backend not in NAMES:
            raise ConfigError(f"--backend must be one of {NAMES}, got {shown(run.backend)}")
        if run.backend != "fast":
            return cls(run.backend)
        return cls("fast", tuple(run.fast_levers), run.fast_gpu_arch)  # 4-bit: ModelArguments.load_in_4bit

    @property
    def family(self) -> str:
        """What a comparison groups by: hf, hf+triton, unsloth or fast (fast's lever variants are one family)."""
        return "hf+triton" if self.triton_mamba_ops else self.name

    @property
    def is_fast(self) -> bool:
        return self.name == "fast"

    @property
    def is_unsloth(self) -> bool:
        return self.name == "unsloth"

    @property
    def is_plain_hf(self) -> bool:
        """transformers' own forward (hf and hf+triton): the baselines the others are compared with."""
        return self.name == "hf"

    @property
    def checkpoints_itself(self) -> bool:
        """Unsloth and fast apply their own activation checkpointing: the Trainer's must stay off."""
        return self.name in ("unsloth", "fast")

    @property
    def needs_cuda(self) -> bool:
        return self.is_unsloth or self.triton_mamba_ops

    @property
    def keeps_sequence_boundaries(self) -> bool:
        """Packed samples stay apart in every mixer (so `--packing` is safe)."""
        return self.is_fast

    @property
    def supports_fsdp2(self) -> bool:
        return self.name == "hf" and not self.triton_mamba_ops
