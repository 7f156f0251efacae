"""fastkd inside other training frameworks: :mod:`fastkd.integrations.transformers` (the ``Trainer``)."""
