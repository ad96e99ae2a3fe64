"""The headline cases: what every suite runs first and what the report's headline block quotes.

One definition of each (BENCHMARKING.md's headline block); the suites and the report both read
them from here. Plain data: the report imports this without torch.
"""

# Fused kernels: the DiT-XL/2 width, a batch of 256 images of 256 tokens (256² latents, patch 2).
KERNEL = {"B": 256, "T": 256, "D": 1152, "dtype": "bfloat16"}
# Layout kernels at the same batch: 4-channel 32x32 latents (256² images), patch 2.
LAYOUT = {"B": 256, "H": 32, "W": 32, "p": 2, "dtype": "bfloat16"}
# Attention: DiT-XL/2's head dim at 256² and 512² (T = 256, 1024); head dim 64 (DiT-S/B/L) at
# T = 256 is the per-FLOP baseline of head dim 72.
ATTENTION_HEAD_DIM = 72
ATTENTION_BASELINE_HEAD_DIM = 64
ATTENTION_T = (256, 1024)
ATTENTION_HEADLINE_T = 256
# End to end: DiT-XL/2 at 256², the training batch per GPU, and 250-step DDPM sampling with CFG
# (the sampling batch: conditional images, each with its unconditional twin).
MODEL = "DiT-XL/2"
RESOLUTION = 256
TRAIN_BATCH = 64
SAMPLE_BATCH = 64
SAMPLER = "ddpm"
SAMPLER_STEPS = 250
