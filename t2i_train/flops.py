"""How much arithmetic a training step does, and how long it is planned to take on named GPUs.

The memory planner's counter (`memory.MemoryCounter`) runs every op of a step on fake tensors; for the
ops that do a step's arithmetic (matmuls, convolutions, attention) it adds their FLOPs by torch's own
formulas (`torch.utils.flop_counter`), keyed by the phase of the step and the arithmetic the GPU runs
them in. Elementwise ops (norms, activations) are not counted: they are bound by memory, not by the
tensor cores that peak figures describe. The optimizer's update is elementwise too, and is counted
from the update's formula (ADAMW_FLOPS_PER_PARAMETER).
"""

import collections

import torch
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

# The CPU's flash attention, which fake CPU tensors dispatch to, does the arithmetic of CUDA's: same formulas.
FLOP_FORMULAS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[aten._scaled_dot_product_flash_attention_backward],
}
CONVOLUTIONS = {aten.convolution, aten._convolution, aten.convolution_backward, aten.cudnn_convolution,
                aten.convolution_overrideable, aten._slow_conv2d_forward}

# The arithmetic an op runs in on an NVIDIA GPU: 16-bit on the tensor cores; float32 convolutions in TF32
# (PyTorch's default, torch.backends.cudnn.allow_tf32); float32 matmuls in full float32 unless --allow_tf32.
HALF, FP32_CONVOLUTION, FP32_MATMUL = "bf16/fp16", "fp32 convolution (TF32)", "fp32 matmul"

# AdamW's update per parameter, as torch writes it: decay (1), first moment (3), second moment (4),
# the denominator (3) and the step (3). Gradient clipping adds its norm and scale (3).
ADAMW_FLOPS_PER_PARAMETER = 14 + 3

# Published dense peaks (no sparsity), TFLOP/s, from NVIDIA's data sheets: 16-bit tensor cores (bf16 with
# float32 accumulation), TF32 tensor cores, and float32 without them.
GPU_PEAKS = {
    "H100 SXM / H200": {"bf16": 989, "tf32": 495, "fp32": 67},
    "A100 SXM": {"bf16": 312, "tf32": 156, "fp32": 19.5},
    "L40S": {"bf16": 362, "tf32": 183, "fp32": 91.6},
    "RTX 4090": {"bf16": 165, "tf32": 82.6, "fp32": 82.6},
    "L4": {"bf16": 121, "tf32": 60, "fp32": 30.3},
}
ASSUMED_UTILISATION = 0.4  # of each peak, for every op: a typical share for diffusion training at scale


def arithmetic(func, args):
    """The arithmetic `func` runs in on a GPU, by the dtype of its first tensor argument."""
    dtype = next((arg.dtype for arg in args if isinstance(arg, torch.Tensor)), torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        return HALF
    return FP32_CONVOLUTION if func._overloadpacket in CONVOLUTIONS else FP32_MATMUL


def op_flops(func, args, kwargs, out):
    """(arithmetic, FLOPs) of one op, or None for an op whose FLOPs are not counted."""
    formula = FLOP_FORMULAS.get(func._overloadpacket)
    if formula is None:
        return None
    return arithmetic(func, args), formula(*args, **(kwargs or {}), out_val=out)


def optimizer_flops(num_parameters):
    return {"elementwise": ADAMW_FLOPS_PER_PARAMETER * num_parameters}


def by_arithmetic(flops_by_phase, phases=None):
    """{arithmetic: FLOPs} of `phases` (all by default) of {phase: {arithmetic: FLOPs}}."""
    counts = collections.Counter()
    for phase, kinds in flops_by_phase.items():
        if phases is None or phase in phases:
            counts.update(kinds)
    return counts


def total(flops_by_phase, phases=None):
    """FLOPs of `phases` (all by default) of {phase: {arithmetic: FLOPs}}."""
    return sum(by_arithmetic(flops_by_phase, phases).values())


def planned_seconds(flops_by_kind, peaks, allow_tf32=False, utilisation=ASSUMED_UTILISATION):
    """Seconds for {arithmetic: FLOPs} on a GPU with `peaks` (TFLOP/s), each op at `utilisation` of
    its peak. Elementwise work is left out: it is bound by memory bandwidth, and small here."""
    rate = {HALF: peaks["bf16"], FP32_CONVOLUTION: peaks["tf32"],
            FP32_MATMUL: peaks["tf32"] if allow_tf32 else peaks["fp32"]}
    return sum(flops / (rate[kind] * 1e12 * utilisation) for kind, flops in flops_by_kind.items() if kind in rate)
