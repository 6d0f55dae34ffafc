"""lqer: low-rank quantization error reconstruction for Qwix.

LQER (plain SVD), L2QER (activation-scaled) and QERA (the closed-form optimum
for the calibration distribution) on top of any Qwix weight quantizer.

The public API is the flat list below (`lqer.LqerRule`, ...); the
subpackages hold it by layer (docs/architecture.md).
"""

from lqer._version import __version__
from lqer.checkpoints.streaming import load_quantized
from lqer.checkpoints.streaming import quantize_checkpoint
from lqer.core.decompose import METHODS
from lqer.core.decompose import SOLVERS
from lqer.lora.adapters import from_lora
from lqer.lora.adapters import lora_rules
from lqer.lora.adapters import to_lora
from lqer.offline.allocation import Allocation
from lqer.offline.allocation import Budget
from lqer.offline.params import lqer_quantize_params
from lqer.offline.probe import OutputProbe
from lqer.offline.probe import output_damage
from lqer.offline.probe import output_sensitivity
from lqer.offline.report import LayerReport
from lqer.offline.report import Report
from lqer.offline.report import report
from lqer.offline.tune import TuneRecord
from lqer.offline.tune import tune_factors
from lqer.providers.calibration import LqerCalibrationProvider
from lqer.providers.calibration import calibrate
from lqer.providers.calibration import output_gradients
from lqer.providers.inference import LqerProvider
from lqer.quant.packing import PackedInt4
from lqer.quant.packing import pack_params
from lqer.quant.rule import LqerRule
from lqer.quant.weight import WithLqer

__all__ = [
  '__version__',
  'Allocation',
  'Budget',
  'LayerReport',
  'LqerCalibrationProvider',
  'Report',
  'calibrate',
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
  'TuneRecord',
  'tune_factors',
]
