"""Training: patch sampling, losses, resumable checkpoints, universal pretraining and per-center LoRA.

Entry points: ``duplus.train.pretrain.run_pretrain`` and ``duplus.train.lora.run_lora``.
"""
