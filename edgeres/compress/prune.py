"""Structured channel pruning on the dependency graph (Torch-Pruning): coupled channels (residual adds)
are removed together, the stem conv and the classifier are protected, and the result is a new
``ResNetSpec`` plus a state_dict that every backend rebuilds exactly.

CIFAR option-A shortcuts (strided slice + zero pad) are first rewritten as an exact, fixed 1×1 stride-2
selection conv with an identity BatchNorm (``shortcut="projection"``): the fp32 output is unchanged, and
the pruner can then remove stream channels cleanly instead of leaving odd widths around the pad.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Iterable

from edgeres.compress import reconstruct
from edgeres.compress.distill import FinetuneConfig, check_finetune_flags, distill
from edgeres.errors import InputError
from edgeres.model.zoo import ResNetSpec
from edgeres.progress import log

MAX_RATIO = 0.95


def _magnitude(p: int):
    def make():
        import torch_pruning as tp

        return tp.importance.GroupMagnitudeImportance(p=p)

    return make


def _bn_scale():
    import torch_pruning as tp

    return tp.importance.BNScaleImportance()


def _taylor():
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance()


@dataclass(frozen=True)
class Importance:
    """A named channel-importance strategy: ``make()`` returns ``group -> per-channel scores``."""

    name: str
    make: Callable[[], Callable]
    needs_gradients: bool = False
    summary: str = ""


IMPORTANCES: dict[str, Importance] = {
    i.name: i
    for i in (
        Importance("l1", _magnitude(1), summary="mean |w| over the coupled group"),
        Importance("l2", _magnitude(2), summary="mean w² over the coupled group"),
        Importance("bn-scale", _bn_scale, summary="|γ| of the group's BatchNorms (network slimming)"),
        Importance("taylor", _taylor, needs_gradients=True,
                   summary="|w·∂L/∂w| from one backward pass over a few batches (needs data)"),
    )
}


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run: ``ratio`` of channels removed per group (uniform) or overall (``global_ranking``)."""

    ratio: float
    importance: str = "l1"
    global_ranking: bool = False
    round_to: int = 8
    steps: int = 1  # >1: reach ``ratio`` in equal steps (recovery in between is the caller's business)
    # opt-in: round widths so the total MACs match the exact ratio (see ``match_macs``); off by default because
    # it leaves narrow layers at widths like 10 or 12, which int8 SIMD kernels pad back up to 16
    match_macs: bool = False
    taylor_images: int = 256
    # with data: refit each pruned layer to the unpruned model's outputs by least squares (edgeres.compress.reconstruct)
    reconstruct: bool = True

    def validate(self, ratio_flag: str = "--ratio", importance_flag: str = "--importance") -> None:
        if not 0.0 <= self.ratio < MAX_RATIO:
            raise InputError(f"{ratio_flag} {self.ratio}: must be in [0, {MAX_RATIO}); e.g. {ratio_flag} 0.3 removes 30 % of channels")
        if self.importance not in IMPORTANCES:
            raise InputError(f"{importance_flag} {self.importance!r}: unknown; choose from {', '.join(IMPORTANCES)}")
        if self.round_to < 1:
            raise InputError(f"--round-to {self.round_to}: must be at least 1 (1 disables rounding)")
        if self.steps < 1:
            raise InputError(f"--steps {self.steps}: must be at least 1")

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "importance": self.importance, "global": self.global_ranking,
                "round_to": self.round_to, "steps": self.steps, "match_macs": self.match_macs}


def round_width(raw: float, original: int, round_to: int) -> int:
    """Nearest multiple of ``round_to`` to ``raw``, never below ``round_to`` nor above ``original``.

    Nearest rather than floor: on CIFAR widths (16/32/64) flooring to 8 would turn ratio 0.3 into 0.5.
    A layer narrower than ``round_to`` keeps its width.
    """
    if original <= round_to:
        return original
    keep = round_to * round(raw / round_to)
    return int(min(original, max(round_to, keep, 1)))


# -- option A → projection ---------------------------------------------------------------------------

def option_a_to_projection(model, spec: ResNetSpec):
    """Exact rewrite of CIFAR option-A shortcuts as fixed 1×1 selection convs + identity BN.

    Returns ``(model, spec)``; the model is modified in place. Identity BN: weight 1, bias 0, mean 0,
    running_var = 1 - eps, so (x - 0) / sqrt(1 - eps + eps) = x exactly.
    """
    import torch
    from torch import nn

    if spec.shortcut != "option_a":
        return model, spec
    new_spec = replace(spec, shortcut="projection")
    for s, n in enumerate(spec.layers):
        for b in range(n):
            if not spec.has_downsample(s, b):
                continue
            block = getattr(model, f"layer{s + 1}")[b]
            old = block.shortcut
            cin, cout = spec.block_in_width(s, b), spec.stage_widths[s]
            stride = spec.stage_strides[s] if b == 0 else 1
            conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            bn = nn.BatchNorm2d(cout)
            with torch.no_grad():
                conv.weight.zero_()
                for i in range(cin):
                    conv.weight[old.pad_lo + i, i, 0, 0] = 1.0
                bn.weight.fill_(1.0)
                bn.bias.zero_()
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            block.downsample = nn.Sequential(conv, bn)
            block.shortcut = None
    return model.eval(), new_spec


# -- pruning -------------------------------------------------------------------------------------------

def spec_from_module(model, spec: ResNetSpec, name: str | None = None) -> ResNetSpec:
    """The spec whose widths are those of the (pruned) torch module; checks the residual stream agrees."""
    last = "conv3" if spec.block == "bottleneck" else "conv2"
    inner_convs = ("conv1", "conv2") if spec.block == "bottleneck" else ("conv1",)
    stage_widths, inner = [], []
    for s, n in enumerate(spec.layers):
        layer = getattr(model, f"layer{s + 1}")
        outs = {getattr(layer[b], last).out_channels for b in range(n)}
        if len(outs) != 1:  # pragma: no cover - the dependency graph keeps residual adds coupled
            raise RuntimeError(f"layer{s + 1}: residual stream widths disagree after pruning: {sorted(outs)}")
        stage_widths.append(outs.pop())
        inner.append(tuple(tuple(getattr(layer[b], c).out_channels for c in inner_convs) for b in range(n)))
    projections = tuple(getattr(getattr(model, f"layer{s + 1}")[0], "downsample", None) is not None
                        for s in range(len(spec.layers)))
    return spec.with_widths(model.conv1.out_channels, stage_widths, inner, name=name, projections=projections)


def _protected(model, spec: ResNetSpec) -> list:
    # hidden Dense layers of a Keras head keep their widths (the spec records them unpruned);
    # their inputs still shrink with the last stage, flatten included
    return [model.conv1, getattr(model, spec.head), *getattr(model, "hidden", ())]


@dataclass(frozen=True)
class GroupScores:
    """One prunable group of coupled channels, scored: enough to rebuild its pruning group and size it."""

    name: str  # the root module's name in the model, e.g. "layer2.0.conv1"
    root: object  # the root module and its pruning handler, for ``DG.get_pruning_group``
    handler: object
    scores: object  # per-channel importance, a float32 CPU tensor
    original: int  # out channels before the first step
    current: int  # out channels now


def module_names(model) -> dict:
    """``{module: dotted name}``: what Torch-Pruning itself names modules by, built from the model's public API."""
    return {module: name for name, module in model.named_modules()}


def _group_key(names: dict, group) -> str:
    root = group[0].dep.target.module
    return names.get(root, repr(root))


def prune_step(model, spec: ResNetSpec, cfg: PruneConfig, target_ratio: float, original_widths: dict[str, int],
               gradient_fn: Callable[[object], None] | None = None) -> None:
    """Prune ``model`` in place so each group keeps ≈ (1 - target_ratio) of its ORIGINAL channels."""
    import torch
    import torch_pruning as tp

    example = torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size)
    model.eval()
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = _score_groups(DG, model, spec, cfg, original_widths, gradient_fn)
    keeps = _allocate(groups, cfg, target_ratio, spec)
    for g, keep in zip(groups, keeps):
        if keep >= g.current:
            continue
        drop = torch.argsort(g.scores)[: g.current - keep].tolist()
        group = DG.get_pruning_group(g.root, g.handler, sorted(drop))
        if DG.check_pruning_group(group):
            group.prune()


def _score_groups(DG, model, spec: ResNetSpec, cfg: PruneConfig, original_widths: dict[str, int],
                  gradient_fn) -> list[GroupScores]:
    """Every prunable group with its importance scores; records each group's width at its first step."""
    import torch

    importance = IMPORTANCES[cfg.importance]
    if importance.needs_gradients:
        if gradient_fn is None:
            raise InputError(f"--importance {cfg.importance}: needs data for a backward pass; give --finetune-data (or --calib for convert)")
        model.zero_grad()
        gradient_fn(model)
    scorer = importance.make()
    names = module_names(model)
    groups = []
    for group in DG.get_all_groups(ignored_layers=_protected(model, spec), root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        root = group[0].dep.target.module
        current = DG.get_out_channels(root)
        key = _group_key(names, group)
        original = original_widths.setdefault(key, current)
        with torch.no_grad():
            scores = scorer(group)
        if scores is None:
            continue
        groups.append(GroupScores(key, root, group[0].dep.handler, scores.detach().float().cpu(), original, current))
    if importance.needs_gradients:
        model.zero_grad(set_to_none=True)
    return groups


def _allocate(groups: list[GroupScores], cfg: PruneConfig, target_ratio: float, spec: ResNetSpec) -> list[int]:
    """Channels to keep per group: the same fraction everywhere, or by one global importance threshold."""
    import torch

    if not cfg.global_ranking:
        if cfg.match_macs:
            return match_macs(groups, spec, target_ratio, cfg.round_to)
        return [min(g.current, round_width(g.original * (1 - target_ratio), g.original, cfg.round_to))
                for g in groups]
    # importance scores are normalised per group (mean 1), so one threshold can rank all groups
    all_scores = torch.cat([g.scores for g in groups])
    total_original = sum(g.original for g in groups)
    n_keep = int(round(total_original * (1 - target_ratio)))
    n_drop = max(0, len(all_scores) - n_keep)
    if n_drop == 0:
        return [g.current for g in groups]
    threshold = torch.sort(all_scores).values[n_drop - 1]
    keeps = []
    for g in groups:
        raw = int((g.scores > threshold).sum())
        keeps.append(min(g.current, round_width(max(raw, 1), g.original, cfg.round_to)))
    return keeps


def width_step(original: int, round_to: int) -> int:
    """The rounding step of one layer: ``round_to``, but at most an eighth of the layer's original width, so
    one step never moves a narrow layer by more than 12.5 % (16 channels round in steps of 2, 64+ in 8s)."""
    return max(1, min(round_to, original // 8))


def _slot(name: str, spec: ResNetSpec):
    """Where a pruning group's width lives in the spec: ("inner", stage, block, i) or ("stream", stage)."""
    parts = name.split(".")
    if not parts[0].startswith("layer") or len(parts) < 3:
        return None
    s, b = int(parts[0][5:]) - 1, int(parts[1])
    inner = ("conv1", "conv2") if spec.block == "bottleneck" else ("conv1",)
    if parts[2] in inner:
        return ("inner", s, b, inner.index(parts[2]))
    return ("stream", s)


def _macs_with(spec: ResNetSpec, slots, widths) -> int:
    stage = list(spec.stage_widths)
    inner = [[list(b) for b in st] for st in spec.inner_widths]
    for slot, w in zip(slots, widths):
        if slot is None:
            continue
        if slot[0] == "stream":
            stage[slot[1]] = w
        else:
            inner[slot[1]][slot[2]][slot[3]] = w
    # pruning keeps every shortcut module, even where widths end up equal
    projections = tuple(spec.has_downsample(s, 0) for s in range(len(spec.layers)))
    return spec.with_widths(spec.stem_width, stage, inner, projections=projections).cost()["macs"]


@dataclass(frozen=True, order=True)
class _Growth:
    """One candidate step back up, ordered as ``match_macs`` prefers them: most shortchanged first, then costlier."""

    # negated, so that ``min`` picks the largest: the share of the original width that rounding took below
    # the exact width, then the MACs the step adds
    minus_shortfall: float
    minus_added_macs: int
    index: int
    width: int
    macs: int  # the model's MACs after the step


def match_macs(groups: list[GroupScores], spec: ResNetSpec, target_ratio: float, round_to: int) -> list[int]:
    """Uniform ratio, rounded without exceeding the MACs of the exact widths ``original × (1 - ratio)``.

    Every width starts rounded DOWN to a multiple of its step (``width_step``); then, while the model still
    fits that MACs budget, the layer that rounding shortchanged most (relative to its original width) gets
    one step back (ties: the costlier one first, so residual streams before the blocks they feed). Plain
    nearest rounding instead changes the ratio layer by layer: at 0.3 a 16-wide layer drops to 8 (−50 %)
    while 44.8 rounds up to 48, and the MACs ratio drifts with the architecture.
    """
    slots = [_slot(g.name, spec) for g in groups]
    originals = [g.original for g in groups]
    caps = [min(g.original, g.current) for g in groups]
    steps = [width_step(o, round_to) for o in originals]
    exact = [o * (1 - target_ratio) for o in originals]
    budget = _macs_with(spec, slots, [min(c, max(1, round(e))) for e, c in zip(exact, caps)])
    keeps = [min(c, max(st, st * math.floor(e / st + 1e-9))) if slot else min(c, round_width(e, o, round_to))
             for e, c, st, o, slot in zip(exact, caps, steps, originals, slots)]
    macs = _macs_with(spec, slots, keeps)
    while True:
        options = []
        for i, (k, st) in enumerate(zip(keeps, steps)):
            grown = min(k + st, caps[i])
            if slots[i] is None or k >= exact[i] or grown == k:
                continue
            trial = _macs_with(spec, slots, keeps[:i] + [grown] + keeps[i + 1:])
            if trial <= budget:
                options.append(_Growth(-round((exact[i] - k) / originals[i], 9), macs - trial, i, grown, trial))
        if not options:
            return keeps
        best = min(options)
        keeps[best.index], macs = best.width, best.macs


def state_dict_of(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def check_rebuild(model, spec: ResNetSpec, state_dict: dict) -> float:
    """Rebuild ``spec`` with ``state_dict`` and compare with ``model``; returns max |Δlogit| (must be 0)."""
    import torch

    from edgeres.model.torch_model import build_torch

    rebuilt = build_torch(spec)
    rebuilt.load_state_dict(state_dict, strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, spec.in_channels, spec.input_size, spec.input_size, generator=g)
    with torch.no_grad():
        err = float((rebuilt.eval()(x) - model.eval()(x)).abs().max())
    if err > 1e-5:
        raise RuntimeError(f"pruned spec {spec.name} does not reproduce the pruned module (max |Δlogit| {err:.3g})")
    return err


def recalibrate_bn(model, batches: Iterable, frozen: Iterable = ()) -> int:
    """Re-estimate BatchNorm running statistics over ``batches`` (float32 NCHW arrays); returns images seen.

    After pruning, each conv sees fewer input channels, so its output statistics moved; the stale
    running mean/var cost more accuracy than the pruned weights themselves.
    """
    import torch

    frozen = set(id(m) for m in frozen)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and id(m) not in frozen]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(torch.as_tensor(x))
                seen += len(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return seen


def identity_bns(model) -> list:
    """The identity BatchNorms of rewritten option-A shortcuts (kept fixed: they must stay identities)."""
    import torch

    out = []
    for m in model.modules():
        ds = getattr(m, "downsample", None)
        if isinstance(ds, torch.nn.Sequential) and len(ds) == 2 and isinstance(ds[1], torch.nn.BatchNorm2d):
            bn = ds[1]
            if getattr(bn, "_edgeres_identity", False):
                out.append(bn)
    return out


def mark_identity_bns(model) -> None:
    """Tag the BNs created by ``option_a_to_projection`` so recalibration and fine-tuning leave them alone."""
    import torch

    for m in model.modules():
        ds = getattr(m, "downsample", None)
        if isinstance(ds, torch.nn.Sequential) and len(ds) == 2 and isinstance(ds[1], torch.nn.BatchNorm2d):
            bn = ds[1]
            if torch.all(bn.running_var == 1.0 - bn.eps) and torch.all(bn.running_mean == 0) \
                    and torch.all(bn.weight == 1) and torch.all(bn.bias == 0):
                bn._edgeres_identity = True


@dataclass
class PruneOutcome:
    """A pruned module, its spec and state_dict, and the record for the checkpoint / manifest."""

    model: object
    spec: ResNetSpec
    state_dict: dict
    record: dict = field(default_factory=dict)


def prune(model, spec: ResNetSpec, cfg: PruneConfig, *, gradient_fn=None, between_steps=None,
          after_step=None) -> PruneOutcome:
    """Prune a torch ResNet built from ``spec`` (deep-copied; the input stays untouched).

    ``gradient_fn(model)`` runs a backward pass (taylor); ``after_step(model, reference)`` repairs a step
    given the model as it was before it (reconstruction); ``between_steps(model, step)`` may fine-tune
    between iterative steps. Returns the pruned module with its new spec and an exact state_dict.
    """
    import copy

    cfg.validate()
    check_prunable(spec)
    model = copy.deepcopy(model).eval()
    before = spec.cost()
    model, work_spec = option_a_to_projection(model, spec)
    mark_identity_bns(model)
    original_widths: dict[str, int] = {}
    base = spec.name.split("-")[0]
    for step in range(1, cfg.steps + 1):
        reference = copy.deepcopy(model) if after_step is not None else None
        prune_step(model, work_spec, cfg, cfg.ratio * step / cfg.steps, original_widths, gradient_fn)
        if after_step is not None:
            after_step(model, reference)
        if between_steps is not None and step < cfg.steps:
            between_steps(model, step)
    new_spec = spec_from_module(model, work_spec, name=f"{base}-pruned{round(cfg.ratio * 100)}")
    sd = state_dict_of(model)
    check_rebuild(model, new_spec, sd)
    after = new_spec.cost()
    record = {**cfg.to_dict(), "source_arch": spec.name, "source_shortcut": spec.shortcut,
              "params_before": before["params"], "params_after": after["params"],
              "macs_before": before["macs"], "macs_after": after["macs"],
              "macs_ratio": round(before["macs"] / after["macs"], 4),
              "stage_widths_before": list(spec.stage_widths), "stage_widths_after": list(new_spec.stage_widths)}
    return PruneOutcome(model, new_spec, sd, record)


# -- the whole job: prune → re-estimate BN → (distil) → measure ----------------------------------------

RECALIBRATION_IMAGES = 2000
CURVE_IMAGES = 1000


def check_data(dataset, spec: ResNetSpec, flag: str, *, labels: bool = False) -> None:
    """Fail before any work if ``dataset`` cannot feed ``spec`` (image size, label range)."""
    from edgeres.calibration import DataError

    from edgeres.measure.evaluate import check_label_range, number_class_folders

    dataset.check_image_size(spec.preprocess)
    if labels and dataset.labels is None:
        raise DataError(f"{dataset.source}: {flag} needs labels (y) to measure accuracy")
    if dataset.class_names is not None:
        number_class_folders(dataset, spec.labels, spec.label_keys)
    check_label_range(dataset, spec.num_classes, fix=f"check {flag} matches the model", error=DataError)


def top1(model, dataset, preprocess, limit: int | None = None, source: str | None = None) -> float:
    from edgeres.measure.evaluate import collect_logits, topk_accuracy, torch_runner

    logits = collect_logits(torch_runner(model.eval()), dataset, preprocess, limit=limit, source=source)
    return topk_accuracy(logits, dataset.labels[dataset.spread(limit)])["top1"]


def prune_loaded(loaded, cfg: PruneConfig, *, train_data=None, finetune=None, eval_data=None,
                 eval_images: int | None = None, curve_images: int = CURVE_IMAGES) -> PruneOutcome:
    """Prune a ``LoadedModel``; with ``train_data`` re-estimate BN (and fine-tune by KD when ``finetune``
    is a ``FinetuneConfig``); with ``eval_data`` measure top-1 before/after. The record holds it all."""
    _check_prune_job(loaded.spec, cfg, train_data, finetune, eval_data)
    t0 = time.perf_counter()
    job = _PruneJob(cfg, loaded.spec, loaded.to_torch(), train_data, finetune, eval_data, curve_images)
    pre = job.spec.preprocess
    top1_before = top1(job.teacher, eval_data, pre, eval_images, loaded.source) if eval_data is not None else None
    outcome = _prune_with_hooks(job)
    record = outcome.record
    if job.reconstructions:
        record["reconstruction"] = job.reconstructions
    record["bn_recalibration_images"] = _recalibrate(job, outcome.model)
    if top1_before is not None:
        record["top1_before"] = top1_before
        record["top1_after_prune"] = top1(outcome.model, eval_data, pre, eval_images)
    _finetune(job, outcome)
    if top1_before is not None:
        record["top1_after"] = top1(outcome.model, eval_data, pre, eval_images)
        record["top1_drop_pp"] = round(top1_before - record["top1_after"], 4)
        record["eval_data"] = eval_data.source
        record["eval_images"] = len(eval_data.spread(eval_images))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return outcome


def check_prunable(spec: ResNetSpec) -> None:
    """Refuse a network the channel pruner cannot keep whole: a grouped conv couples its channels in
    blocks of in/groups, and widths cut across them would no longer split into the same groups."""
    if spec.groups != 1:
        raise InputError(f"pruning refused: {spec.name} has grouped 3×3 convs (groups {spec.groups}, ResNeXt), whose "
                         "channels the pruner cannot cut group by group; convert it unpruned (int8 keeps every channel)")
    if spec.preact:
        raise InputError(f"pruning refused: {spec.name} is a pre-activation ResNet (v2), whose BatchNorms before each "
                         "block the pruner does not cut with the channels they normalise yet; convert it unpruned (int8 "
                         "keeps every channel)")
    if spec.stem == "deep" or spec.shortcut == "avg_projection":
        raise InputError(f"pruning refused: {spec.name} is a ResNet-D (deep stem, average-pool shortcuts), whose widths "
                         "edgeres does not read back after pruning yet; convert it unpruned (int8 keeps every channel)")


def _check_prune_job(spec: ResNetSpec, cfg: PruneConfig, train_data, finetune, eval_data) -> None:
    """Refuse, before any work, a job whose options or data do not fit together."""
    cfg.validate()
    check_prunable(spec)
    if finetune is not None:
        finetune.validate()
        check_finetune_flags(finetune.epochs, train_data)
        if cfg.steps > 1 and finetune.epochs < cfg.steps:
            raise InputError(f"--steps {cfg.steps}: needs at least {cfg.steps} --epochs (one recovery epoch per step)")
    elif cfg.steps > 1:
        raise InputError(f"--steps {cfg.steps}: iterative pruning recovers between steps; give --finetune-data and --epochs")
    if IMPORTANCES[cfg.importance].needs_gradients and train_data is None:
        raise InputError(f"--importance {cfg.importance}: needs data for a backward pass; give --finetune-data (or --calib for convert)")
    if train_data is not None:
        check_data(train_data, spec, "--finetune-data")
    if eval_data is not None:
        check_data(eval_data, spec, "--eval", labels=True)


@dataclass(frozen=True)
class _PruneJob:
    """One ``prune_loaded`` run as its hooks see it; the lists fill in as the steps run."""

    cfg: PruneConfig
    spec: ResNetSpec
    teacher: object  # the unpruned torch model: distillation teacher and taylor's stand-in labels
    train_data: object | None
    finetune: FinetuneConfig | None
    eval_data: object | None
    curve_images: int
    reconstructions: list = field(default_factory=list)  # one record per reconstructed step
    step_curves: list = field(default_factory=list)  # the recovery epoch between iterative steps


def _prune_with_hooks(job: _PruneJob) -> PruneOutcome:
    """``prune`` with the hooks the job's data allows: taylor gradients, reconstruction, recovery epochs."""
    cfg, has_data = job.cfg, job.train_data is not None
    log(f"pruning {job.spec.name}: ratio {cfg.ratio}, importance {cfg.importance}, "
        f"{'global' if cfg.global_ranking else 'uniform'}, round to {cfg.round_to}"
        f"{' (MACs-matched)' if cfg.match_macs and not cfg.global_ranking else ''}")
    return prune(job.teacher, job.spec, cfg, gradient_fn=partial(_taylor_gradients, job) if has_data else None,
                 between_steps=partial(_recovery_epoch, job) if cfg.steps > 1 else None,
                 after_step=partial(_refit, job) if has_data and cfg.reconstruct else None)


def _taylor_gradients(job: _PruneJob, model) -> None:
    """Backward passes for taylor importance; images without labels learn the teacher's top-1."""
    import torch
    import torch.nn.functional as F

    n = min(job.cfg.taylor_images, len(job.train_data))
    for x, y in job.train_data.batches(job.spec.preprocess, 64, n):
        x = torch.from_numpy(x)
        logits = model(x)
        target = torch.from_numpy(y) if y is not None else job.teacher(x).argmax(1)
        F.cross_entropy(logits, target).backward()


def _recalibrate(job: _PruneJob, model) -> int:
    """Re-estimate BN statistics on the training images; returns images seen (0: not done)."""
    # reconstructed layers already produce the unpruned pre-BN statistics; re-estimating them from the
    # pruned model costs accuracy (ResNet-32, ratio 0.3: 87.0 → 84.2 % on 2000 dev images)
    if job.train_data is None or job.reconstructions:
        return 0
    n = min(RECALIBRATION_IMAGES, len(job.train_data))
    batches = (x for x, _ in job.train_data.batches(job.spec.preprocess, 100, n))
    return recalibrate_bn(model, batches, frozen=identity_bns(model))


def _curve_top1(job: _PruneJob, model) -> float:
    return top1(model, job.eval_data, job.spec.preprocess, min(job.curve_images, len(job.eval_data)))


def _curve_evaluator(job: _PruneJob):
    """What ``distill`` measures top-1 with after each epoch, or None without eval data."""
    return partial(_curve_top1, job) if job.eval_data is not None else None


def _refit(job: _PruneJob, model, reference) -> None:
    """Least-squares refit of each pruned layer to ``reference``, the model before this step."""
    images, batch = reconstruct.plan(job.spec)
    n = min(images, len(job.train_data))
    log(f"reconstructing pruned layers from {n} images (least squares to the unpruned outputs)")
    batches = (x for x, _ in job.train_data.batches(job.spec.preprocess, batch, n))
    rec = reconstruct.reconstruct(model, reference, job.spec, batches)
    skipped = rec["skipped_too_few_images"]
    log(f"reconstructed {rec['layers']} layers in {rec['seconds']:.0f} s"
        + (f"; kept the pruned weights of {len(skipped)} layers with too few images for a fit"
           f" ({', '.join(skipped[:3])}…)" if skipped else ""))
    job.reconstructions.append(rec)


def _recovery_epoch(job: _PruneJob, model, step: int) -> None:
    """Between iterative steps: re-estimate BN, then one KD epoch (its own seed per step)."""
    _recalibrate(job, model)
    log(f"iterative step {step}/{job.cfg.steps}: one recovery epoch")
    ft = replace(job.finetune, epochs=1, seed=job.finetune.seed + 1000 * step)
    curve = distill(model, job.teacher, job.train_data, job.spec.preprocess, ft,
                    frozen_bns=identity_bns(model), evaluate=_curve_evaluator(job))
    job.step_curves.append({"step": step, "curve": curve})


def _finetune(job: _PruneJob, outcome: PruneOutcome) -> None:
    """KD fine-tuning with the epochs the iterative steps left; refreshes the state_dict if weights moved."""
    record, finetune, train_data, eval_data = outcome.record, job.finetune, job.train_data, job.eval_data
    if finetune is not None:
        ft = replace(finetune, epochs=finetune.epochs - (job.cfg.steps - 1))
        curve = distill(outcome.model, job.teacher, train_data, job.spec.preprocess, ft,
                        frozen_bns=identity_bns(outcome.model), evaluate=_curve_evaluator(job))
        record["finetune"] = {**finetune.to_dict(), "data": train_data.source, "images": len(train_data.spread(finetune.images)),
                              "curve_images": min(job.curve_images, len(eval_data)) if eval_data is not None else None,
                              "iterative_steps": job.step_curves, "curve": curve}
        outcome.state_dict = state_dict_of(outcome.model)
        check_rebuild(outcome.model, outcome.spec, outcome.state_dict)
    elif record["bn_recalibration_images"]:
        outcome.state_dict = state_dict_of(outcome.model)


def check_output_path(out, model=None, *, force: bool = False) -> None:
    """Refuse an --out that cannot hold a checkpoint, is the input ``model``, or exists (unless ``force``)."""
    import os
    from pathlib import Path

    from edgeres.sources.loading import TORCH_SUFFIXES

    p = Path(out)
    if p.suffix.lower() not in TORCH_SUFFIXES:
        raise InputError(f"--out {p}: give a checkpoint file name ending in {' '.join(TORCH_SUFFIXES)}")
    if p.is_dir():
        raise InputError(f"--out {p}: is a folder; give a file name such as pruned.pt")
    parent = p.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"--out {p}: folder {parent} does not exist or is not writable")
    if p.exists() and model is not None and _same_file(p, Path(model)):
        raise InputError(f"--out {p}: is the input model {model}; write the pruned checkpoint to another file "
                         "(--force never replaces the input)")
    if p.exists() and not force:
        raise InputError(f"--out {p}: already exists; give another file name, or --force to replace it")


def _same_file(a, b) -> bool:
    """Same file on disk: also through symlinks and hard links."""
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:  # one side vanished or cannot be stat'ed: compare what the names resolve to
        return a.resolve() == b.resolve()


def save_pruned(out, outcome: PruneOutcome, model, *, force: bool = False) -> None:
    """Write the pruned checkpoint atomically, re-checking ``--out`` first: pruning may have taken minutes."""
    from edgeres.sources.loading import save_checkpoint

    check_output_path(out, model, force=force)
    save_checkpoint(out, outcome.spec, outcome.state_dict, extra={"pruning": outcome.record})


def prune_into_loaded(loaded, cfg, calib_data=None, eval_data=None):
    """``convert --prune``: the pruned model as a ``LoadedModel`` whose ``extra["pruning"]`` is the record.

    Calibration images (train split) re-estimate BN and feed taylor; fine-tuning only with
    ``cfg.finetune_data`` and ``cfg.finetune_epochs``.
    """
    from edgeres.calibration import open_dataset

    prune_cfg = PruneConfig(ratio=cfg.prune, importance=cfg.prune_importance)
    prune_cfg.validate("--prune", "--prune-importance")
    check_finetune_flags(cfg.finetune_epochs, cfg.finetune_data)
    finetune, train = None, calib_data
    if cfg.finetune_data is not None:
        train = open_dataset(cfg.finetune_data)
        if cfg.finetune_epochs:
            finetune = FinetuneConfig(epochs=cfg.finetune_epochs)
    outcome = prune_loaded(loaded, prune_cfg, train_data=train, finetune=finetune, eval_data=eval_data,
                           eval_images=cfg.eval_images)
    extra = {**(loaded.extra or {}), "pruning": outcome.record}
    return replace(loaded, spec=outcome.spec, state_dict=outcome.state_dict, extra=extra)
