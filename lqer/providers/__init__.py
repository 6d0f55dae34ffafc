"""Qwix providers: inference (`LqerProvider`), calibration and output-
gradient taps (`LqerCalibrationProvider`), and the quantized matmuls.
"""
