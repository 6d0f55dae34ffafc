"""lqer: low-rank quantization error reconstruction for Qwix.

LQER (plain SVD), L2QER (activation-scaled) and QERA (the closed-form optimum
for the calibration distribution) on top of any Qwix weight quantizer.
"""

from lqer.allocation import Budget
from lqer.calibration import LqerCalibrationProvider, output_gradients
from lqer.decompose import METHODS, SOLVERS
from lqer.lora import from_lora, lora_rules, to_lora
from lqer.packing import PackedInt4, pack_params
from lqer.params import lqer_quantize_params
from lqer.probe import OutputProbe, output_damage, output_sensitivity
from lqer.provider import LqerProvider
from lqer.reporting import LayerReport, Report, report
from lqer.rule import LqerRule
from lqer.streaming import load_quantized, quantize_checkpoint
from lqer.weight import WithLqer

__all__ = [
    'Budget',
    'LayerReport',
    'LqerCalibrationProvider',
    'Report',
    'report',
    'LqerProvider',
    'LqerRule',
    'METHODS',
    'OutputProbe',
    'PackedInt4',
    'SOLVERS',
    'WithLqer',
    'from_lora',
    'lora_rules',
    'load_quantized',
    'lqer_quantize_params',
    'output_damage',
    'output_gradients',
    'output_sensitivity',
    'pack_params',
    'quantize_checkpoint',
    'to_lora',
]
__version__ = '0.1.0'
