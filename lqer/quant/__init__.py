"""lqer's types: the rule, the weight wrapper, statistics, bases, factors,
the packed int4 format, bit accounting and rule recipes.
"""
