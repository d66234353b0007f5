"""Every constant the lynx ops, kernels, passes and options share, in one Triton-free module.

Names and codes here are part of the ops' contract: the C kernels (lynx_cpu.c) and the
Triton kernels index their activation and policy switches by these codes, and the options
(lynx_compile/config.py) take their defaults from here. Importing this module needs only
torch (for the dtype tuples).
"""

from __future__ import annotations

import torch

# ------------------------------------------------------------------------ routing policies
POLICIES = ("exact", "affinity", "oea", "static")
POLICY_CODES = {name: code for code, name in enumerate(POLICIES)}  # the Triton route kernel's
WEIGHT_CONVENTIONS = ("renorm", "mass")  # how the model normalises its top-k weights
SCORE_SPACES = ("logit", "prob", "score")  # what a scored router's ranking score is
# One bin of a "score" ranking is 1/(4 alpha) wide: sigmoid and softmax have slope at most
# 1/4 per logit, so scores within one bin include every expert within 1/alpha logits.
# (lynx_cpu.c's ranked_score writes the same 4.)
SCORE_BINS_PER_UNIT = 4.0

# Defaults: the accuracy harness (docs/results/accuracy.md) picks the default policy.
DEFAULT_POLICY = "affinity"
DEFAULT_ALPHA = 3.0  # affinity bins of 1/alpha logits
DEFAULT_BETA = 2.0  # affinity bins floored at -beta (None: no floor)
DEFAULT_K0 = 2  # experts each token keeps under oea (its kept set is their union)
# Experts each token keeps from its own top-k under affinity (the protected choice;
# AffinityBinning decides the rest). 0 is LYNX as published. static protects none by
# default (its budget is what it promises), but takes k0 as affinity does.
DEFAULT_PROTECTED_K0 = 1
DEFAULT_BUDGET = 16  # experts a batch keeps under static


def default_k0(policy: str) -> int:
    """The k0 a policy gets when none is given: oea's kept experts, affinity's protected ones
    (DEFAULT_PROTECTED_K0), none for static and exact."""
    return {"oea": DEFAULT_K0, "affinity": DEFAULT_PROTECTED_K0}.get(policy, 0)


# Most negative affinity bin kept as an integer; -inf logits (masked experts) land here.
MIN_BIN = -(2**30)

# ------------------------------------------------------------------------- expert compute
# Activation names in code order: lynx_cpu.c, lynx_ops.cpp and triton_experts.py switch on
# these codes, so a new activation is appended (never renumber). The elementwise ones act
# on the gate (gated: act(gate) * up) or on h (plain); "relu2" is relu(h)**2 (NemotronH's
# ReLUSquaredActivation). The gated activations with a combine of their own are
# parameterised by lynx::experts' act_alpha / act_limit: "swiglu_clamped" (GPT-OSS) is
#   g = min(gate, limit), u = clamp(up, -limit, limit), (u + 1) * g * sigmoid(alpha * g).
ACTIVATION_NAMES = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamped", "relu2")
GLU_ACTIVATIONS = ("swiglu_clamped",)
ELEMENTWISE_ACTIVATIONS = tuple(a for a in ACTIVATION_NAMES if a not in GLU_ACTIVATIONS)
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATION_NAMES)}

# --------------------------------------------------------------------------- kernel limits
# The Triton routing kernel holds one token's experts and its top-k in registers.
ROUTE_MAX_EXPERTS = 512
ROUTE_MAX_TOP_K = 16
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # both Triton kernels' inputs

# The native CPU kernels: routing computes in float32 from these score dtypes (exact);
# the experts kernel computes on float32 or bfloat16 weights, the other dtypes run its
# ATen path (lynx_ops.cpp).
NATIVE_ROUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NATIVE_EXPERTS_DTYPES = (torch.float32, torch.bfloat16)


def route_fits_triton(num_experts: int, top_k: int) -> bool:
    """Whether the Triton routing kernel takes this router shape."""
    return num_experts <= ROUTE_MAX_EXPERTS and top_k <= ROUTE_MAX_TOP_K
