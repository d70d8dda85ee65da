"""Tiny random Llama models for the LoRA tests (fp32, CPU, built from a fixed seed)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers.tiny_llama import tiny_llama_config


@pytest.fixture(scope="session")
def _tiny_llama_master():
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def tiny_llama(_tiny_llama_master):
    """A factory of identical copies of one fixed random tiny Llama (eval mode, fp32)."""
    return lambda: copy.deepcopy(_tiny_llama_master)


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))
