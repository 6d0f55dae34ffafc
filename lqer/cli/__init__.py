"""The `lqer` command line: one module per command (`eval`, `finetune`,
`quantize`), `common` for what they share, `tasks` for the bundled models.
"""
