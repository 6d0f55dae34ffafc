"""The one place lqer touches Qwix's private modules and protected members.

Everything else in lqer uses public `qwix.*` names (`qwix.QArray`,
`qwix.dequantize`, `qwix.PtqProvider`, `qwix.quantize_params`,
`qwix.QuantizationRule`, ...) and the names below, so a Qwix release that
moves its internals is an edit to this file alone. `pyproject.toml` pins
qwix exactly for the same reason.

Pinned: qwix 0.1.8. What Qwix main (google/qwix aa623ac, 2026-08-13) moves,
and what to change here when lqer upgrades:

* `WithAux` lives in `qwix/_src/providers/boxed_param.py`;
  `ptq.WithAux` stays as an alias there, so `WithAux` below keeps working,
  but import it from `boxed_param` then.
* `PtqProvider` and `LoraProvider` subclass a new public
  `qwix.BoxedParamProvider` (the weight-boxing half of `PtqProvider`), and
  `LoraProvider` is no longer a `PtqProvider`. lqer's providers subclass
  `qwix.PtqProvider` and lqer never tests a LoRA provider with
  `isinstance(p, qwix.PtqProvider)`, so nothing else depends on it.
* `_get_current_rule_and_op_id` (used by `current_rule` / `count_op`) and
  `_rules` (`rules_of`) are unchanged on main.
"""

from qwix._src.core import dot_general as _dot_general
from qwix._src.core import einsum as _einsum
from qwix._src.core import einsum_info as _einsum_info
from qwix._src.core import qarray as _qarray
from qwix._src.providers import ptq as _ptq
from qwix._src.utils import flax_util as _flax_util
from qwix.contrib import awq_core as _awq_core
from qwix.contrib import calibration as _contrib_calibration

# Arrays (qwix/_src/core/qarray.py): how a weight is quantized, and the
# quantize that takes a HowToQuantize (public `qwix.quantize` takes kwargs).
HowToQuantize = _qarray.HowToQuantize
quantize = _qarray.quantize
calibrate = _qarray.calibrate
compute_scale_zero_point = _qarray.compute_scale_zero_point
quantize_with_scale_zero_point = _qarray.quantize_with_scale_zero_point

# The boxed weight Qwix's PTQ params hold (moves to boxed_param.py on main).
WithAux = _ptq.WithAux

# Einsum parsing and the HowToQuantize of an op's operands.
EinsumInfo = _einsum_info.EinsumInfo
dot_general_how_to_quantize = _dot_general.get_how_to_quantize
einsum_how_to_quantize = _einsum.get_how_to_quantize

# Flax plumbing (Linen and NNX alike).
unbox = _flax_util.unbox
update_boxed = _flax_util.update_boxed
find_param = _flax_util.find_param
get_current_module = _flax_util.get_current_module
get_current_module_path = _flax_util.get_current_module_path
get_or_create_variable = _flax_util.get_or_create_variable
get_value_from_path = _flax_util.get_value_from_path
should_update_quant_stats = _flax_util.should_update_quant_stats

# qwix.contrib: AWQ's scaled quantization, and weight normalisation to
# (rows, contracting) shared by its calibrated methods.
awq_quantize_weight = _awq_core.quantize_weight
normalize_weight = _contrib_calibration.normalize_weight


def current_rule(provider, op_name: str):
  """The rule `provider` matched for the op being traced (Qwix counts it)."""
  rule, _ = provider._get_current_rule_and_op_id(op_name, only_rule=True)  # pylint: disable=protected-access
  return rule


def count_op(provider, op_name: str) -> None:
  """Advance Qwix's per-module op counter as its own providers do."""
  provider._get_current_rule_and_op_id(op_name)  # pylint: disable=protected-access


def rules_of(provider) -> list:
  """The rules a Qwix provider was built with."""
  return provider._rules  # pylint: disable=protected-access
