"""Everything that runs experiments.

Import rule: modules the CLI/TUI use at queue time (spec, tasks, models, methods.catalog, metrics)
must import without torch; only the worker and the method modules import torch.
"""
