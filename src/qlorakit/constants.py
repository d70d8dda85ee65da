"""Names and sizes shared by the configs and the modules that implement them (imports nothing).

Kept free of torch so that ``qlorakit --help`` and config validation stay fast.
"""

#: The 4-bit data types (``qlorakit.quant.codebooks`` builds their tables).
QUANT_TYPES = ("nf4", "fp4", "int4")

#: No quantization: the frozen base stays as plain ``nn.Linear`` in the compute dtype (16/32-bit LoRA).
QUANT_NONE = "none"

#: Storage types of the frozen base that ``QuantConfig.quant_type`` accepts: a 4-bit type or ``"none"``.
BASE_QUANT_TYPES = QUANT_TYPES + (QUANT_NONE,)

#: Allowed block sizes of the 4-bit quantization (powers of two, as bitsandbytes allows).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Optimizer names accepted by ``qlorakit.optim.make_optimizer`` and ``--optim``.
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")

#: Learning-rate schedules after warmup (``OptimConfig.scheduler``, ``qlorakit.optim.lr_at``).
SCHEDULERS = ("constant", "cosine", "linear")

#: Compute dtypes by name (``TrainConfig.compute_dtype`` also takes ``"auto"``; the planner's ``--compute-dtype``).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

#: LoRA initializations (``LoraConfig.init``).
LORA_INITS = ("default", "gaussian", "zeros")

#: Training data formats (``DataConfig.format``; ``qlorakit.data.formats``).
DATA_FORMATS = ("auto", "alpaca", "dolly", "oasst1", "messages", "self-instruct", "text", "preference")

#: Training objectives (``ObjectiveConfig.method``; ``qlorakit.train.preference``): supervised fine-tuning, DPO, ORPO.
TRAIN_METHODS = ("sft", "dpo", "orpo")

#: What a run trains (``TrainConfig.finetune``): LoRA adapters on a frozen base, or every weight of the model
#: (full fine-tuning; ``qlorakit.train.full``).
FINETUNE_LORA = "lora"
FINETUNE_FULL = "full"
FINETUNE_MODES = (FINETUNE_LORA, FINETUNE_FULL)

#: Where DPO's reference log-probabilities come from (``ObjectiveConfig.dpo_reference``).
DPO_REFERENCES = ("auto", "cached", "same-step")

#: Target tokens per chunk of the chunked head + cross-entropy (``MemoryConfig.loss_chunk_tokens``). 128 was the
#: fastest of 256 / 128 / 64 on a 2-core Xeon, bf16 and fp32, and the leaner: ``benchmarks/loss_chunk.py``.
LOSS_CHUNK_TOKENS = 128

#: What ``qlorakit train``'s default memory budget leaves free of the available memory (``hardware.available_memory``):
#: this fraction of it, and at least ``MEMORY_BUDGET_MARGIN_MIN_BYTES`` (the planner's stated error is ~15%).
MEMORY_BUDGET_MARGIN_FRACTION = 0.15
MEMORY_BUDGET_MARGIN_MIN_BYTES = 512 * 2**20

#: transformers norm classes computing ``weight * (x * rsqrt(mean(x^2, -1) + eps))`` with ``variance_epsilon``
#: (``train.rmsnorm`` fuses them for training, ``generate.lean`` calls ``F.rms_norm`` for them).
RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
#: Set (True) on a norm module whose output a forward hook casts back to its input's dtype
#: (``models.build.keep_norm_outputs_in_input_dtype``); ``train.rmsnorm``'s 16-bit path relies on it.
NORM_OUTPUT_IN_INPUT_DTYPE = "qlorakit_output_in_input_dtype"

#: transformers MLP classes computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (``train.recompute``).
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")

#: Run trackers ``TrainConfig.report_to`` may name (``qlorakit.train.tracking``), with the module each needs.
REPORT_TARGETS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}

#: Distributed strategies (``ParallelConfig.distributed``, ``qlorakit.parallel``): ``auto`` picks with the planner.
DISTRIBUTED_STRATEGIES = ("auto", "ddp", "fsdp")
#: How ``--distributed fsdp`` loads the 4-bit base (``parallel.fsdp_load``): each rank streams the checkpoint and
#: keeps its own rows; rank 0 loads and scatters; every rank loads it whole and shards it afterwards.
FSDP_LOAD_STREAM, FSDP_LOAD_BROADCAST, FSDP_LOAD_WHOLE = "stream", "broadcast", "whole"
FSDP_LOAD_MODES = (FSDP_LOAD_STREAM, FSDP_LOAD_BROADCAST, FSDP_LOAD_WHOLE)

#: Seconds a collective may wait for the other ranks before the process group gives up (a dead or hung rank).
DIST_TIMEOUT_S = 600
