"""Math on arrays: decompositions, GPTQ, metrics, kernel layouts, paths.

Nothing here knows Flax modules, providers or lqer's weight types.
"""
