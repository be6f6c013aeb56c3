"""Quantised inference on CPU: the LLM's linear layers with int8 weights.

`quantize(model, "int8")` replaces the LLM's linear layers (attention projections, the MLP's
input projections, the output layer) by torch's dynamically quantised linear layer: int8 weights
per output channel, activations quantised on the fly, matmuls in fbgemm's int8 kernels. The MLP's
output projection (`down_proj`, `fc2`, ...) stays float: its input, the activation after the
nonlinearity, carries the large outliers that a per-tensor int8 activation cannot hold. Measured on
the digits model (30 george clips): every linear layer int8 agreed with fp32 on 3 of 30 answers,
the LLM's layers without the MLP output projections on 30 of 30; the encoder in int8 gained no
time and cost an answer, so the encoder and the projector stay float too. Inference only; the
saved model stays float.

    model, processor = load_speech_lm("runs/digits/model")
    quantize(model, "int8")

int4 has no CPU kernel in this install (torchao's int4 CPU layout is not installed), so it is
refused with that reason rather than faked; on CUDA, bitsandbytes' 8/4-bit loading is the usual
route. What quantisation costs in accuracy and gives in speed is measured in
benchmarks/latency.py.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from ..errors import EarfulError

logger = logging.getLogger(__name__)

MODES = ("int8",)
# MLP output projections, by the names transformers' LLMs give them: kept float (see above).
KEPT_FLOAT = ("down_proj", "fc2", "mlp.c_proj", "dense_4h_to_h", "w2")


class QuantizeError(EarfulError, ValueError):
    """A quantisation this machine or this model cannot run."""


def quantize(model: nn.Module, mode: str | None) -> nn.Module:
    """`model` with its linear layers quantised in place (`mode` "int8"); None leaves it as it is."""
    if mode in (None, "", "none", "fp32"):
        return model
    if mode == "int4":
        raise QuantizeError("--quantize int4: no int4 CPU kernel is available here (torchao's int4 CPU layout is not installed); "
                            "use --quantize int8, or on CUDA load the LLM in 4-bit with bitsandbytes")
    if mode not in MODES:
        raise QuantizeError(f"--quantize {mode!r}: expected int8 (or int4 where a kernel exists)")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise QuantizeError(f"--quantize int8: torch's int8 linear layers run on the CPU; the model is on {device} "
                            "(on CUDA, load the LLM in 8-bit with bitsandbytes)")
    if "fbgemm" not in torch.backends.quantized.supported_engines and "x86" not in torch.backends.quantized.supported_engines:
        raise QuantizeError(f"--quantize int8: this torch build has no x86 int8 engine ({torch.backends.quantized.supported_engines})")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    llm = getattr(model, "language_model", model)
    names = [n for n, m in llm.named_modules() if isinstance(m, nn.Linear) and not n.endswith(KEPT_FLOAT)]
    if not names:
        raise QuantizeError("--quantize int8: the model's LLM has no linear layers to quantise")
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice: it is the int8 CPU path torch ships
        warnings.simplefilter("ignore")
        quantize_dynamic(llm, {n: per_channel_dynamic_qconfig for n in names}, inplace=True)
    model.eval().requires_grad_(False)
    logger.info("quantised %d of the LLM's linear layers to int8 (per-channel weights, dynamic activations); "
                "MLP output projections, the encoder and the projector stay float", len(names))
    return model


def quantized_layers(model: nn.Module) -> int:
    """How many of the model's linear layers are int8."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(isinstance(m, DynamicLinear) for m in model.modules())
