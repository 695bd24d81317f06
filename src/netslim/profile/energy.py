"""An explicit, documented energy model for one inference.

Source: the 45 nm CMOS per-operation energies of Horowitz, "Computing's energy problem"
(ISSCC 2014), as used by Han et al., "Deep Compression" (ICLR 2016, Fig. 1 / sec. 1) and
"EIE" (ISCA 2016, Table I):

===============================  ==========
operation                        energy (pJ)
===============================  ==========
32-bit float add                 0.9
32-bit float multiply            3.7
16-bit float add / multiply      0.4 / 1.1
8-bit int add / multiply         0.03 / 0.2
32-bit SRAM read (8 KB cache)    5
32-bit DRAM read                 640
===============================  ==========

Model: every stored weight bit is fetched from DRAM once per inference (the parameter
memory term that Deep Compression shrinks); every activation element is written once and
read once from SRAM; every effective (non-skipped) MAC costs one multiply and one add at
the weights' bit width. The model is an estimate for comparing a model with its compressed
version, not a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import NetslimError

MAC_PJ = {32: 3.7 + 0.9, 16: 1.1 + 0.4, 8: 0.2 + 0.03}
SRAM_PJ_PER_32BIT = 5.0
DRAM_PJ_PER_32BIT = 640.0


@dataclass(frozen=True)
class EnergyEstimate:
    compute_pj: float
    weight_memory_pj: float
    activation_memory_pj: float

    @property
    def total_pj(self) -> float:
        return self.compute_pj + self.weight_memory_pj + self.activation_memory_pj


def estimate_energy(effective_macs: int, stored_bytes: int, activation_bytes: int, mac_bits: int = 32) -> EnergyEstimate:
    """Energy of one inference under the 45 nm model above (``mac_bits`` in 8, 16, 32)."""
    if mac_bits not in MAC_PJ:
        raise NetslimError(f"mac_bits must be one of {sorted(MAC_PJ)}, got {mac_bits}")
    compute = effective_macs * MAC_PJ[mac_bits]
    weight_memory = stored_bytes / 4 * DRAM_PJ_PER_32BIT
    activation_memory = 2 * activation_bytes / 4 * SRAM_PJ_PER_32BIT
    return EnergyEstimate(compute, weight_memory, activation_memory)
