"""A plan in words a data owner can judge (``fed-plan show``, ``fed-worker requests show``).

Every string a plan or a task carries is hostile: names are identifiers once verified, and
:func:`escape` still shows every other character of whatever is printed as an escape
(``\\x1b``), so no text can move the cursor, erase a line or write over the review.
"""

from __future__ import annotations

from fedcore.losses import LOSSES
from fedcore.plan import TrainConfig
from fedcore.policy.check import DP_CLIP_KEY, DP_NOISE_MULTIPLIER_KEY
from fedcore.weights import total_bytes

from .dataflow import BUFFER_KINDS
from .load import VerifiedPlan
from .text import escape

__all__ = ["describe_plan", "escape"]


def _memory(plan: VerifiedPlan) -> str:
    a = plan.activation
    return (
        f"tensors take at most {a.fixed / 1e6:.2f} MB + {a.per_example / 1e3:.1f} kB per "
        "example in a forward pass"
    )


def _flow(plan: VerifiedPlan) -> list[str]:
    flow = plan.analysis.flow
    lines = [
        "  uploads     the trainable parameters, moved by gradients of the loss on this "
        "silo's batches"
        + (", and the buffer updates below" if flow.updates else "; no buffer is updated")
    ]
    for kind, meaning in BUFFER_KINDS.items():
        names = flow.updated(kind)
        if names:
            lines.append(f"  updates     {kind} ({meaning}): {escape(', '.join(names))}")
    if flow.rewritten or plan.eval_analysis.flow.rewritten:
        count = len(flow.rewritten) + len(plan.eval_analysis.flow.rewritten)
        lines.append(f"  rewritten   {count} uninitialised allocation(s) (empty_like) to zeros")
    return lines


def _histogram(ops: dict[str, int]) -> str:
    return ", ".join(f"{op} x{n}" for op, n in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_plan(
    plan: VerifiedPlan, *, train: TrainConfig | None = None, secagg: bool | None = None
) -> list[str]:
    """What ``plan`` computes and, when known, how the coordinator asks to train it."""
    s = plan.summary
    buffers = [t for t in s.state if t.name not in s.trainable]
    lines = [
        f"plan '{escape(plan.program.name)}'",
        f"  hash        {plan.hash}",
        f"  input       {s.input}  ->  output {s.output}",
        f"  parameters  {s.num_parameters:,} trainable in {len(s.trainable)} tensors "
        f"({total_bytes(s.state) / 1e6:.2f} MB with {len(buffers)} buffers)",
        f"  constants   {len(s.constants)} tensor(s), never trained",
        f"  loss        {plan.program.loss}: {LOSSES.get(plan.program.loss, '?')}",
        f"  operations  {s.nodes} nodes in training: {_histogram(s.ops)}",
    ]
    if plan.eval_summary.ops != s.ops:
        lines.append(f"  evaluation  {_histogram(plan.eval_summary.ops)}")
    lines.append(f"  memory      {_memory(plan)}")
    lines.extend(_flow(plan))
    lines.append(
        "  can do      only the operations above, on the input batch and these weights: "
        "no file, network or process access; the allow-list is in docs/plans.md"
    )
    if train is None:
        lines.append(
            "  training    set by the coordinator with each round's task "
            "(fed-worker requests show lists the one requested)"
        )
    else:
        extra = ", ".join(
            f"{escape(k)}={v:g}" for k, v in train.extra.items() if not k.startswith("dp.")
        )
        lines.append(
            f"  training    {train.epochs} local epoch(s), batch {train.batch_size}, "
            f"{escape(train.optimizer)} lr {train.learning_rate:g}, momentum {train.momentum:g}, "
            f"weight decay {train.weight_decay:g}" + (f", {{{extra}}}" if extra else "")
        )
        if DP_CLIP_KEY in train.extra:
            noise = train.extra.get(DP_NOISE_MULTIPLIER_KEY)
            lines.append(
                f"  DP          client-level: each update clipped to L2 norm "
                f"{train.extra[DP_CLIP_KEY]:g}"
                + (f", noise multiplier {noise:g}" if noise is not None else ", no noise added")
            )
        else:
            lines.append(
                "  DP          no client-level DP asked for (the worker's own DP-SGD, if any, "
                "applies: see docs/plans.md)"
            )
    if secagg is not None:
        lines.append(
            "  secagg      "
            + (
                "on: the coordinator sees only the sum of the updates"
                if secagg
                else "off: the coordinator sees this worker's update"
            )
        )
    return lines
