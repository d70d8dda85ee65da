"""The 4-bit and 8-bit code tables: the single home of these constants.

A 4-bit code is an index 0..15 into a table of 16 values in [-1, 1]; a block of weights is stored as
``absmax * table[index]`` (QLoRA, Dettmers et al. 2023, section 3).

- **NF4** (NormalFloat, QLoRA eq. 4): quantiles of N(0, 1), asymmetric so that zero is exact.
  With ``delta = 0.9677083`` (the outermost probability), 8 positive values are
  ``ppf(linspace(delta, 0.5, 9)[:-1])`` and 7 negative values are ``-ppf(linspace(delta, 0.5, 8)[:-1])``,
  plus one exact 0; the sorted table is divided by its maximum so it spans [-1, 1].
  The computation below follows bitsandbytes' ``create_normal_map`` step for step (fp32 linspace,
  fp64 quantile function, fp32 normalisation) so the table is bit-identical to the published one.
- **FP4**: E2M1 as bitsandbytes defines it. A code is ``sign | e1 e0 | m``; ``e = 0`` is subnormal
  (``m * 2**-4``), otherwise ``(1 + m/2) * 2**(4 - e)`` — note bitsandbytes' exponent runs downwards.
  The 16 values are divided by their maximum (12).
- **INT4**: the symmetric grid ``k / 7``, k = 7..0, -0..-7, in bitsandbytes' index order.
- **dynamic8**: bitsandbytes' signed 8-bit dynamic map (used for double quantization and 8-bit optimizer
  state): a sign, a run of zero bits giving a decimal exponent, then a linear fraction.

``midpoints(table)`` gives the decision points used by the quantizer: a value maps to the nearest table
entry, and a value exactly on a midpoint maps to the lower one.
"""

from __future__ import annotations

from functools import cache

import torch

from qlorakit.constants import QUANT_TYPES

#: The outermost quantile of the NF4 construction (bitsandbytes' ``create_normal_map`` default).
NF4_OFFSET = 0.9677083

#: The published NF4 values (QLoRA appendix E / bitsandbytes); tests hold the derived table to these.
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def _nf4_table() -> torch.Tensor:
    # 8 positive quantiles (probabilities from delta down to 0.5, exclusive) and 7 negative ones.
    pos_p = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double()
    neg_p = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double()
    positive = torch.special.ndtri(pos_p)
    negative = -torch.special.ndtri(neg_p)
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    return values / values.max()


def _fp4_table() -> torch.Tensor:
    magnitudes = []
    for pattern in range(8):  # 3 bits: e1 e0 m
        exponent, mantissa = pattern >> 1, pattern & 1
        if exponent == 0:
            magnitudes.append(mantissa * 2.0**-4)
        else:
            magnitudes.append((1.0 + mantissa / 2.0) * 2.0 ** (4 - exponent))
    values = torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float32)
    return values / values.abs().max()


def _int4_table() -> torch.Tensor:
    values = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7], dtype=torch.float32)
    return values / values.abs().max()


@cache
def _table_cpu(quant_type: str) -> torch.Tensor:
    builders = {"nf4": _nf4_table, "fp4": _fp4_table, "int4": _int4_table}
    if quant_type not in builders:
        from qlorakit.errors import QuantizationError

        raise QuantizationError(f"unknown quant_type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    table = builders[quant_type]()
    table.requires_grad_(False)
    return table


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 table of ``quant_type`` (a fresh tensor; index = 4-bit code)."""
    return _table_cpu(quant_type).to(device, copy=True)


def dynamic_map_8bit(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map (256 sorted fp32 values in [-1, 1]).

    For exponent level i = 0..6 there are ``2**i + 1`` (signed) or ``2**(i+1) + 1`` (unsigned) linearly
    spaced boundaries in [0.1, 1]; their midpoints scaled by ``10**(i - 6)`` (and their negatives when
    signed) are the codes, plus 0 and 1, padded with zeros to 256 and sorted.
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        extra_bit = 0 if signed else 1
        n_items = 2 ** (i + non_sign_bits - max_exponent_bits + extra_bit) + 1
        boundaries = torch.linspace(0.1, 1, n_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@cache
def _dynamic_cpu() -> torch.Tensor:
    return dynamic_map_8bit()


def dynamic_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map used for double quantization (a fresh fp32[256] tensor)."""
    return _dynamic_cpu().to(device, copy=True)


def midpoints(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision points of a table: ``(bounds, order)``.

    ``order`` sorts the table ascending (stable, so of two equal entries — FP4/INT4 have +0 and -0 —
    the lower index comes first); ``bounds[i]`` is the midpoint of sorted entries i and i+1.
    ``order[bucketize(x, bounds)]`` is then the code of the nearest entry, ties going to the lower entry.
    """
    order = torch.argsort(table, stable=True)
    ordered = table[order]
    bounds = (ordered[:-1] + ordered[1:]) / 2
    return bounds, order
