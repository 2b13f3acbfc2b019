"""The demo and the local broker: the one part of ``gpumeter`` that composes agent, pipeline and billing.

Everything else in ``gpumeter`` is the core (contract, settings, errors, the CLI root) and imports
none of them; ``tests/unit/test_layers.py`` holds both rules.
"""
