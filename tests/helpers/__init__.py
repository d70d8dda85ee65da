"""Helpers shared by the tests, imported as a package: ``from tests.helpers.tiny_llama import tiny_llama_config``.

- ``tiny_llama``: the one tiny Llama configuration (and a saved model directory built from it);
- ``tiny_models``: tiny random models of four architectures for the loading tests;
- ``gguf_files``: tiny Llama GGUF files written with the ``gguf`` package;
- ``data``, ``lora``, ``optim``, ``train``, ``triton_checks``: pieces shared by those test directories.
"""
