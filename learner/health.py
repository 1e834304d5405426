"""Expert health: utilisation, drift and HoME's three anomalies, from the gates every family reports.

Between two reports (every ``learner.cadence.health_every_steps`` steps) a :class:`GateAccumulator` sums,
per task ``t`` and expert ``e``, the gate weights of ``ModelOutput.gates`` (batches are scored with the
weights being trained, so these are the gates the model really used). A report then holds:

- **mean gate weight** ``(T, E)``: the average weight task ``t``'s gate gave expert ``e``.
- **routing share** ``(T, E)``, each row summing to 1: for sparse families (those reporting
  ``lb_stats``, i.e. SMES) the share of task ``t``'s routing choices that picked ``e``; for dense
  families the share of task ``t``'s gate mass on ``e``. This is the distribution the drift and the
  heatmap use.
- **drift**: Jensen-Shannon divergence (base 2, in [0, 1]; the square of scipy's ``jensenshannon``
  distance) of each task's routing share against (a) the share recorded in the manifest of the last
  published snapshot and (b) the mean share of the previous ``reference_reports`` reports.
- **load-balance score** ``N·Σ_i f_i·P_i`` over all tasks (1 when the load is uniform, ``N`` when one
  expert takes everything): ``f_i`` the share of routing choices (sparse) or of top-1 choices (dense)
  going to expert ``i``, ``P_i`` its mean gate probability.
- **anomalies** (HoME, Wang et al. 2024, section 1):

  - *collapse*: an expert whose activations are (near-)zero more than ``zero_frac_max`` of the time, or
    whose output scale (RMS of its output over the batch) is "far" from the others: outside
    ``[median / scale_ratio, median · scale_ratio]`` of all experts' scales. The scale comes from a
    forward hook on the family's expert bank (:class:`ExpertScaleProbe`); families that dispatch rows
    to experts (SMES) have none, and only the zero fraction is checked.
  - *degradation*: a shared expert (one at least two tasks can see) that takes at least
    ``degradation_share`` of its gate mass from one task; experts whose mean gate weight per task that
    sees them is under ``degradation_min_mass`` are ignored (nobody uses them, so the share is noise).
  - *underfitting*: a sparse task (cumulative positive rate under ``sparse_positive_rate``) that puts more
    than ``underfit_shared_mass`` of its mixing weight on shared experts rather than its own. The mixing
    weight includes HoME's self gate when the family reports one (``extras["self_gates"]``), since the
    tower sees the sum. Families without task-specific experts (shared-bottom, OMoE, MMoE, SMES) cannot
    underfit this way; the check is skipped and the report says so.

Which experts a task can see comes from the family's declared ``pools`` and ``groups`` (``MultiTaskModel``;
``"task:<name>"``: that task only, ``"group:<name>"``: the group's tasks, any other pool: every task); families
without pools let every task see every expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon
from torch import Tensor, nn

from learner.config import HealthConfig
from learner.models import ExpertBank, ModelOutput, MultiTaskModel, load_balance_loss


@dataclass(frozen=True)
class Anomaly:
    kind: str
    """"collapse", "degradation" or "underfitting"."""
    subject: str
    """The expert or task it concerns, e.g. ``"expert global/1"`` or ``"task like"``."""
    detail: str
    value: float

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.subject}"


def expert_names(model: MultiTaskModel) -> list[str]:
    """``"<pool>/<i>"`` for families with pools, else ``"e<i>"``."""
    names = [f"e{e}" for e in range(model.n_gate_experts)]
    for pool, members in model.pools.items():
        for i, e in enumerate(members):
            names[e] = f"{pool}/{i}"
    return names


def expert_visibility(model: MultiTaskModel, tasks: Sequence[str]) -> np.ndarray:
    """``(T, E)`` bool: which experts each task's gate can reach (see the module docstring)."""
    n_experts = model.n_gate_experts
    if not model.pools:
        return np.ones((len(tasks), n_experts), dtype=bool)
    visible = np.zeros((len(tasks), n_experts), dtype=bool)
    for pool, members in model.pools.items():
        kind, _, name = pool.partition(":")
        seen_by = [name] if kind == "task" else list(model.groups[name]) if kind == "group" else list(tasks)
        for t, task in enumerate(tasks):
            if task in seen_by:
                visible[t, list(members)] = True
    return visible


def routing_share(gate_sums: np.ndarray, choice_counts: np.ndarray, sparse: bool) -> np.ndarray:
    """``(T, E)`` rows summing to 1: routing choices (sparse) or gate mass (dense) per expert."""
    raw = choice_counts if sparse else gate_sums
    total = raw.sum(axis=1, keepdims=True)
    return np.divide(raw, total, out=np.zeros_like(raw, dtype=np.float64), where=total > 0)


def js_divergence(current: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per row ``(T,)``: Jensen-Shannon divergence, base 2 (0 identical, 1 disjoint)."""
    return np.asarray(jensenshannon(current, reference, base=2, axis=1), dtype=np.float64) ** 2


def load_balance_score(counts: np.ndarray, prob_sums: np.ndarray, n_slots: float) -> float:
    """``N·Σ f_i·P_i`` (the SMES regulariser without its coefficient)."""
    t = torch.as_tensor
    return float(load_balance_loss(t(counts, dtype=torch.float64), t(prob_sums, dtype=torch.float64),
                                   float(n_slots), len(counts)))


def detect_collapse(
    zero_frac: np.ndarray, scale: np.ndarray | None, config: HealthConfig, names: Sequence[str]
) -> list[Anomaly]:
    """Experts that are mostly dead, or whose output scale is far from the median expert's."""
    found = [
        Anomaly("collapse", f"expert {names[e]}", f"{z:.0%} of activations are zero", float(z))
        for e, z in enumerate(zero_frac)
        if z > config.zero_frac_max
    ]
    if scale is not None and len(scale) > 1:
        median = float(np.median(scale))
        for e, s in enumerate(scale):
            ratio = s / median if median > 0 else float("inf")
            if median > 0 and not (1 / config.scale_ratio <= ratio <= config.scale_ratio):
                found.append(Anomaly("collapse", f"expert {names[e]}",
                                     f"output scale {s:.3g} is {ratio:.3g}x the median {median:.3g}", float(ratio)))
    return found


def detect_degradation(
    mean_gate: np.ndarray, visible: np.ndarray, tasks: Sequence[str], config: HealthConfig, names: Sequence[str]
) -> list[Anomaly]:
    """Shared experts whose gate mass comes almost all from one task."""
    found = []
    for e in np.flatnonzero(visible.sum(axis=0) >= 2).tolist():
        mass = mean_gate[:, e] * visible[:, e]  # (T,)
        if mass.sum() / visible[:, e].sum() < config.degradation_min_mass:
            continue
        top = int(mass.argmax())
        share = float(mass[top] / mass.sum())
        if share >= config.degradation_share:
            found.append(Anomaly("degradation", f"expert {names[e]}",
                                 f"{share:.0%} of its gate mass comes from {tasks[top]}", share))
    return found


def detect_underfitting(
    mixing: np.ndarray,
    visible: np.ndarray,
    tasks: Sequence[str],
    positive_rate: Mapping[str, float],
    config: HealthConfig,
) -> list[Anomaly] | None:
    """Sparse tasks leaning on shared experts; None when no task has experts of its own (skipped)."""
    shared = visible.sum(axis=0) >= 2  # (E,)
    own = visible & ~shared  # (T, E)
    if not own.any():
        return None
    found = []
    for t, task in enumerate(tasks):
        rate = positive_rate.get(task, float("nan"))
        total = mixing[t].sum()
        if not own[t].any() or not np.isfinite(rate) or rate >= config.sparse_positive_rate or total <= 0:
            continue
        on_shared = float(mixing[t, shared & visible[t]].sum() / total)
        if on_shared > config.underfit_shared_mass:
            found.append(Anomaly("underfitting", f"task {task}",
                                 f"positive rate {rate:.2%}, {on_shared:.0%} of its mixing weight on shared experts",
                                 on_shared))
    return found


class AlertLimiter:
    """At most one alert per key per ``every_s`` seconds."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def allow(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            return False
        self._last[key] = now
        return True


class ExpertScaleProbe:
    """Forward hook on the last expert bank of a family: RMS output per expert, summed until taken."""

    def __init__(self, model: nn.Module, n_experts: int) -> None:
        banks = [m for m in model.modules() if isinstance(m, ExpertBank) and m.n == n_experts]
        self._sum: Tensor | None = None
        self._n = 0
        self._handle = banks[-1].register_forward_hook(self._hook) if banks else None

    def _hook(self, module: nn.Module, inputs: object, h: Tensor) -> None:
        rms = h.detach().float().square().mean(dim=(0, 2)).sqrt()  # (E,)
        self._sum = rms if self._sum is None else self._sum + rms
        self._n += 1

    def take(self) -> np.ndarray | None:
        if self._sum is None:
            return None
        scale = (self._sum / self._n).cpu().numpy()
        self._sum, self._n = None, 0
        return scale

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


@dataclass
class GateWindow:
    """What a :class:`GateAccumulator` summed since the last report, as numpy."""

    rows: int
    gate_sums: np.ndarray  # (T, E)
    choice_counts: np.ndarray  # (T, E)
    mixing_sums: np.ndarray  # (T, E)
    zero_frac: np.ndarray  # (E,)
    lb_counts: np.ndarray  # (E,)
    lb_prob_sums: np.ndarray  # (E,)
    lb_slots: float
    sparse: bool

    @property
    def mean_gate(self) -> np.ndarray:
        return self.gate_sums / max(self.rows, 1)


class GateAccumulator:
    """Sums gate statistics over steps on the model's device (no host sync per step)."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._rows = 0
        self._batches = 0
        self._sparse = False

    def add(self, output: ModelOutput, tasks: Sequence[str]) -> None:
        gates = torch.stack([output.gates[t].detach().float() for t in tasks], dim=1)  # (B, T, E)
        self_gates = output.extras.get("self_gates")
        mixing = gates if self_gates is None else gates + self_gates.detach().float()
        mixing = mixing / mixing.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, T, E)
        if output.lb_stats is not None:
            counts, prob_sums, slots = (s.detach().float() for s in output.lb_stats)
        else:  # dense: Switch's f_i from top-1 choices, P_i from the gate probabilities
            counts = torch.bincount(gates.argmax(dim=-1).flatten(), minlength=gates.shape[-1]).float()
            prob_sums, slots = gates.sum(dim=(0, 1)), gates.new_tensor(float(gates.shape[0] * gates.shape[1]))
        parts = {
            "gate": gates.sum(dim=0), "choice": (gates > 0).float().sum(dim=0), "mixing": mixing.sum(dim=0),
            "zero": output.expert_zero_frac.detach().float(), "lb_counts": counts, "lb_probs": prob_sums,
            "lb_slots": slots,
        }
        for k, v in parts.items():
            self._sums[k] = v if k not in self._sums else self._sums[k] + v
        self._rows += gates.shape[0]
        self._batches += 1
        self._sparse = output.lb_stats is not None

    def take(self) -> GateWindow | None:
        if not self._batches:
            return None
        s = {k: v.cpu().numpy().astype(np.float64) for k, v in self._sums.items()}
        window = GateWindow(
            rows=self._rows, gate_sums=s["gate"], choice_counts=s["choice"], mixing_sums=s["mixing"],
            zero_frac=s["zero"] / self._batches, lb_counts=s["lb_counts"], lb_prob_sums=s["lb_probs"],
            lb_slots=float(s["lb_slots"]), sparse=self._sparse,
        )
        self._sums, self._rows, self._batches = {}, 0, 0
        return window


class HealthMonitor:
    """Accumulates gates every step (:meth:`observe`) and builds a report (a JSON-able dict) when asked.

    ``published_share`` is the routing share recorded with the last published snapshot (drift (a));
    the caller updates it after each publish (:meth:`published`).
    """

    def __init__(
        self, config: HealthConfig, tasks: Sequence[str], model: MultiTaskModel, published: Mapping | None = None
    ) -> None:
        self.config = config
        self.tasks = list(tasks)
        self.names = expert_names(model)
        self.visible = expert_visibility(model, self.tasks)
        self.gates = GateAccumulator()
        self.probe = ExpertScaleProbe(model, model.n_gate_experts)
        self.limiter = AlertLimiter(config.alert_every_s)
        self.history: list[tuple[int, np.ndarray]] = []  # (step, routing share (T, E))
        self.published_share: np.ndarray | None = None
        self.published(published)
        self.reports = 0

    def published(self, experts: Mapping | None) -> None:
        """Take the ``experts`` record of a published manifest as the drift reference (a)."""
        if not experts:
            return
        share = np.asarray(experts.get("routing_share", []), dtype=np.float64)
        if list(experts.get("tasks", [])) == self.tasks and share.shape == self.visible.shape:
            self.published_share = share

    def record(self) -> dict | None:
        """What a manifest keeps of the latest report, for drift against it later."""
        if not self.history:
            return None
        return {"tasks": self.tasks, "experts": self.names, "routing_share": self.history[-1][1].tolist()}

    def observe(self, output: ModelOutput) -> None:
        self.gates.add(output, self.tasks)

    def report(self, step: int, positive_rate: Mapping[str, float], now: float) -> dict | None:
        window = self.gates.take()
        scale = self.probe.take()
        if window is None:
            return None
        share = routing_share(window.gate_sums, window.choice_counts, window.sparse)  # (T, E)
        reference = [s for _, s in self.history[-self.config.reference_reports :]]
        self.history = [*self.history[-(self.config.history - 1) :], (step, share)]
        cfg, names, tasks = self.config, self.names, self.tasks
        anomalies = [
            *detect_collapse(window.zero_frac, scale, cfg, names),
            *detect_degradation(window.mean_gate, self.visible, tasks, cfg, names),
        ]
        underfit = detect_underfitting(window.mixing_sums / window.rows, self.visible, tasks, positive_rate, cfg)
        skipped = {}
        if underfit is None:
            skipped["underfitting"] = "no task-specific experts in this family"
        else:
            anomalies += underfit
        self.reports += 1

        def drift(against: np.ndarray | None) -> dict[str, float]:
            if against is None:
                return {}
            return dict(zip(tasks, js_divergence(share, against).tolist()))

        return {
            "step": step,
            "time": now,
            "tasks": tasks,
            "experts": names,
            "sparse": window.sparse,
            "rows": window.rows,
            "mean_gate": window.mean_gate.tolist(),
            "routing_share": share.tolist(),
            "zero_frac": window.zero_frac.tolist(),
            "output_scale": None if scale is None else scale.tolist(),
            "load_balance": load_balance_score(window.lb_counts, window.lb_prob_sums, window.lb_slots),
            "drift_vs_published": drift(self.published_share),
            "drift_vs_reference": drift(np.mean(reference, axis=0) if reference else None),
            "anomalies": [a.__dict__ for a in anomalies],
            "alerts": [a.__dict__ for a in anomalies if self.limiter.allow(a.key, now)],
            "skipped": skipped,
        }


def report_metrics(report: Mapping) -> dict[str, float]:
    """Flat W&B metrics of a report: ``health/...``."""
    out: dict[str, float] = {"health/load_balance": report["load_balance"]}
    for t, task in enumerate(report["tasks"]):
        for e, name in enumerate(report["experts"]):
            out[f"health/gate/{task}/{name}"] = report["mean_gate"][t][e]
            out[f"health/share/{task}/{name}"] = report["routing_share"][t][e]
    for e, name in enumerate(report["experts"]):
        out[f"health/zero_frac/{name}"] = report["zero_frac"][e]
        if report["output_scale"] is not None:
            out[f"health/output_scale/{name}"] = report["output_scale"][e]
    for kind in ("published", "reference"):
        out.update({f"health/drift_{kind}/{t}": v for t, v in report[f"drift_vs_{kind}"].items()})
    for kind in ("collapse", "degradation", "underfitting"):
        out[f"health/anomalies/{kind}"] = float(sum(a["kind"] == kind for a in report["anomalies"]))
    return out
