"""The NNX calibrate -> quantize flow that several tests run on their own
modules."""

import dataclasses

from flax import nnx
import jax.numpy as jnp
import qwix

import lqer


def quantized(make, rules, x, gradients=False, **quantize_kw):
  """(LQER model, float params, statistics): make() calibrated on x (with
  `gradients`, output gradients too), then quantized by
  lqer_quantize_params(**quantize_kw) into an LqerProvider model (float32
  compute); with return_allocation=True, the `lqer.Allocation` as a fourth
  value."""
  cal = qwix.quantize_model(make(), lqer.LqerCalibrationProvider(rules), x)
  cal(x)
  stats = nnx.to_pure_dict(nnx.state(cal, qwix.QuantStat))
  if gradients:
    tapped = qwix.quantize_model(
      make(), lqer.LqerCalibrationProvider(rules, output_gradients=True), x
    )
    stats = lqer.output_gradients(tapped, None, [(x,)], stats)
  model = qwix.quantize_model(
    make(), lqer.LqerProvider(rules, compute_dtype=jnp.float32), x
  )
  fp = nnx.to_pure_dict(nnx.state(make(), nnx.Param))
  out = lqer.lqer_quantize_params(fp, model, calibration=stats, **quantize_kw)
  if quantize_kw.get('return_allocation'):  # (params, allocation)
    out, allocation = out
    nnx.update(model, out)
    return model, fp, stats, allocation
  nnx.update(model, out)
  return model, fp, stats


def ptq(make, rules, x, fp, stats):
  """The same model under plain PTQ (the first rule without a rank)."""
  model = qwix.quantize_model(
    make(), lqer.LqerProvider([dataclasses.replace(rules[0], rank=None)]), x
  )
  nnx.update(model, lqer.lqer_quantize_params(fp, model, calibration=stats))
  return model
