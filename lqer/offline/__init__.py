"""The offline pass: quantize params and fit factors (`lqer_quantize_params`),
rank allocation, output probes, and the report.
"""
