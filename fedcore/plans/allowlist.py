"""The operations a plan may use: ATen operators by name, plus integer arithmetic on sizes.

A node's target is allowed when it is ``torch.ops.aten.<name>.<overload>`` with ``<name>`` in
:data:`ATEN_OPS` and an overload that does not write into a caller's tensor (``out``), or
one of the :data:`SIZE_OPS` that ``torch.export`` emits to compute shapes from the dynamic
batch size. Everything else is refused: Python callables, custom operators (any namespace
but ``aten``), and every higher-order operator (``cond``, ``while_loop``, ``map``,
``wrap_with_set_grad_enabled``, ``invoke_subgraph``, ...), which would run sub-graphs whose
behaviour this flat check could not bound.

The list is core ATen plus the composite operators that ``torch.export``'s training IR keeps
for common models (convolutions, linear layers, pooling, normalization, attention,
embeddings, activations, shape manipulation, elementwise arithmetic and reductions). None of
them reads or writes files, sockets or process state; each only computes on tensors.
"""

from __future__ import annotations

__all__ = ["ATEN_OPS", "SIZE_OPS", "is_allowed"]

#: ATen operator names (all overloads but ``out`` variants), grouped by what models use them for.
ATEN_OPS: frozenset[str] = frozenset(
    {
        # layers
        "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
        "linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "einsum", "embedding",
        "scaled_dot_product_attention", "lstm", "gru", "rnn_tanh", "rnn_relu",
        # pooling
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
        "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
        "upsample_nearest2d", "upsample_bilinear2d", "_upsample_nearest_exact2d",
        # normalization
        "batch_norm", "_native_batch_norm_legit_functional", "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training", "native_batch_norm", "layer_norm",
        "native_layer_norm", "group_norm", "native_group_norm", "instance_norm", "rms_norm",
        # activations
        "relu", "relu_", "relu6", "gelu", "silu", "silu_", "tanh", "sigmoid", "hardtanh",
        "hardtanh_", "hardswish", "hardsigmoid", "leaky_relu", "leaky_relu_", "elu", "selu",
        "softplus", "mish", "softmax", "_softmax", "log_softmax", "_log_softmax",
        # dropout (a no-op in evaluation graphs)
        "dropout", "feature_dropout", "alpha_dropout", "native_dropout",
        # shapes and views
        "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "flatten", "unflatten",
        "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "clone", "select",
        "slice", "narrow", "cat", "concat", "stack", "split", "split_with_sizes", "chunk",
        "unbind", "repeat", "index_select", "gather", "flip", "roll", "pad",
        "constant_pad_nd", "alias", "detach", "detach_", "lift_fresh_copy", "type_as",
        "_to_copy", "to", "sym_size", "sym_numel", "sym_stride", "size", "numel", "dim",
        # elementwise arithmetic
        "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "abs",
        "pow", "sqrt", "rsqrt", "exp", "log", "log1p", "sin", "cos", "erf", "reciprocal",
        "clamp", "clamp_min", "clamp_max", "minimum", "maximum", "where", "masked_fill",
        "lerp", "square", "sign", "floor", "ceil", "round", "copy_", "fill_", "zero_",
        # comparisons and logic
        "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
        # reductions
        "mean", "sum", "amax", "amin", "max", "min", "argmax", "argmin", "var", "std",
        "var_mean", "norm", "linalg_vector_norm", "cumsum", "logsumexp", "prod",
        # creation (sizes come from the graph, which the verifier bounds)
        "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "empty_like",
        "arange", "scalar_tensor", "tril", "triu",
        # run-time checks torch.export inserts
        "_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range_for_size",
    }
)  # fmt: skip

#: Integer arithmetic on symbolic sizes (``x.shape[0] * 4``), as the serializer names it.
SIZE_OPS: frozenset[str] = frozenset(
    {
        "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv",
        "_operator.mod", "_operator.neg", "_operator.eq", "_operator.ne", "_operator.lt",
        "_operator.le", "_operator.gt", "_operator.ge", "_operator.truediv",
    }
)  # fmt: skip

_ATEN_PREFIX = "torch.ops.aten."


def is_allowed(target: str) -> bool:
    """Whether a serialized node target (``"torch.ops.aten.conv2d.default"``) is allowed."""
    if target in SIZE_OPS:
        return True
    if not target.startswith(_ATEN_PREFIX):
        return False
    parts = target[len(_ATEN_PREFIX) :].split(".")
    if len(parts) != 2:
        return False
    name, overload = parts
    return name in ATEN_OPS and not (overload == "out" or overload.endswith("_out"))
