"""The methods compared, as alignd requests (SamplingFields + the `alignment` field)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TEMPERATURE = 0.7
FAMILIES = ("greedy", "sample", "bon", "bonp", "block", "args", "tq", "vas", "dera")


@dataclass(frozen=True)
class Task:
    name: str  # sentiment | detox
    reward: str  # the guiding reward model's name in the engine
    value: str | None  # VAS value model's name (None: VAS not run)
    aligned: str | None  # the task's aligned (DPO) model: DeRa's served model, Transfer Q*'s baseline
    fmt: str  # chat | raw


@dataclass(frozen=True)
class EngineSpec:
    served: str
    reference: str | None = None
    baseline: str | None = None  # None: Transfer Q* rolls out the served model

    def label(self) -> str:
        parts = [f"served={self.served}"]
        if self.reference:
            parts.append(f"reference={self.reference}")
        if self.baseline:
            parts.append(f"baseline={self.baseline}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    temperature: float
    decoder: str | None = None
    n: int = 1  # best_of_n: samples per returned choice; blockwise: blocks per round
    choices: int = 1  # request `n` (best-of-128 = 2 choices x best_of_n 64, winner of all 128)
    weight: float | None = None  # args / transfer_q reward weight
    beta: float | None = None  # vas
    lam: float | None = None  # dera lambda
    top_k: int = 10
    rollout: int = 20
    prune: tuple[int, float] | None = None  # pruned best_of_n: (every, keep)
    block: int = 16  # blockwise: tokens per block
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def param(self) -> float | None:
        return next((x for x in (self.weight, self.beta, self.lam) if x is not None), None) \
            if self.family not in ("bon", "bonp") else float(self.n * self.choices)

    def alignment(self, task: Task) -> dict | None:
        if self.decoder is None:
            return None
        al: dict = {"decoder": self.decoder}
        if self.decoder == "best_of_n":
            al |= {"rewards": {task.reward: 1.0}, "n": self.n, "return_candidates": self.choices > 1}
            if self.prune:
                al["prune"] = {"every": self.prune[0], "keep": self.prune[1]}
        elif self.decoder == "blockwise":
            al |= {"rewards": {task.reward: 1.0}, "n": self.n, "block_tokens": self.block}
        elif self.decoder in ("args", "transfer_q"):
            al |= {"rewards": {task.reward: self.weight}, "top_k": self.top_k}
            if self.decoder == "transfer_q":
                al["rollout_tokens"] = self.rollout
        elif self.decoder == "vas":
            al |= {"values": {task.value: self.beta}, "top_k": self.top_k}
        elif self.decoder == "dera":
            al["lambda"] = self.lam
        return al

    def engine(self, task: Task, base: str) -> EngineSpec | None:
        """The engine this method needs; None for "any engine that serves the base model"."""
        if self.family == "dera":
            return EngineSpec(served=task.aligned, reference=base)
        if self.family == "tq":
            return EngineSpec(served=base, baseline=task.aligned)
        return None

    def describe(self, task: Task) -> str:
        t = "greedy" if self.temperature == 0 else f"T = {self.temperature}"
        if self.family == "greedy":
            return "greedy decoding of the base model"
        if self.family == "sample":
            return f"sampling of the base model, {t}, top-p 1"
        if self.family == "bon":
            total = self.n * self.choices
            how = "" if self.choices == 1 else f" (request n = {self.choices} x best_of_n {self.n}, " \
                                                "return_candidates; the best of all)"
            return f"best-of-{total}: {total} samples ({t}) ranked by `{task.reward}`{how}"
        if self.family == "bonp":
            every, keep = self.prune or (0, 0.0)
            return (f"pruned best-of-{self.n} (Speculative Rejection): {self.n} samples ({t}); every {every} tokens "
                    f"the best {keep:g} of the live ones by `{task.reward}` go on")
        if self.family == "block":
            return (f"blockwise search: rounds of {self.n} blocks of {self.block} tokens ({t}), the best by "
                    f"`{task.reward}` kept (prefix caching is off in this benchmark, so each round re-reads "
                    "its prompt: its wall time here is an upper bound)")
        if self.family == "args":
            return f"ARGS-greedy, k = {self.top_k}, w = {self.weight:g} on `{task.reward}`"
        if self.family == "tq":
            base = f"`{task.aligned}`" if task.aligned else "the served base model"
            return (f"Transfer Q*, greedy, k = {self.top_k}, {self.rollout}-token greedy rollouts of {base}, "
                    f"w = {self.weight:g} on `{task.reward}`")
        if self.family == "vas":
            return f"VAS, k = {self.top_k}, beta = {self.beta:g} on value `{task.value}`, then {t}"
        return f"DeRa, lambda = {self.lam:g} (0 = the SFT reference, 1 = the DPO model), then {t}"

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def fmt_num(x: float) -> str:
    return f"{x:g}"


def all_methods(task: Task, args) -> list[Method]:
    """Every method that exists for `task` with these settings (before --methods filtering)."""
    T = TEMPERATURE
    out = [Method("greedy", "greedy", 0.0), Method("sample", "sample", T)]
    for n in args.bon:
        if n > 64:
            if n % 64:
                raise SystemExit(f"quality: best-of-{n}: above 64, n must be a multiple of 64")
            if task.name in args.bon_large_tasks:
                out.append(Method(f"bon{n}", "bon", T, "best_of_n", n=64, choices=n // 64))
        else:
            out.append(Method(f"bon{n}", "bon", T, "best_of_n", n=n))
    out += [Method(f"bonp{n}", "bonp", T, "best_of_n", n=n, prune=(args.prune_every, args.prune_keep))
            for n in args.bon_pruned]
    for spec in args.blockwise:
        n, _, block = spec.partition(":")
        out.append(Method(f"block{n}x{block}", "block", T, "blockwise", n=int(n), block=int(block)))
    out += [Method(f"args-w{fmt_num(w)}", "args", 0.0, "args", weight=w, top_k=args.args_k) for w in args.args_weights]
    out += [Method(f"tq-w{fmt_num(w)}", "tq", 0.0, "transfer_q", weight=w, top_k=args.tq_k, rollout=args.tq_rollout)
            for w in args.tq_weights]
    if task.value:
        out += [Method(f"vas-b{fmt_num(b)}", "vas", T, "vas", beta=b, top_k=args.vas_k) for b in args.vas_betas]
    if task.aligned:
        out += [Method(f"dera-l{fmt_num(x)}", "dera", T, "dera", lam=x) for x in args.dera_lambdas]
    return out


def select(methods: list[Method], wanted: list[str] | None) -> list[Method]:
    if not wanted:
        return methods
    return [m for m in methods if m.name in wanted or m.family in wanted]
