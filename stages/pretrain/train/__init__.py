"""Training, in one place: the per-worker loop (loop.py), the CapFilt fine-tunes (finetune.py), the
DeepSpeed config (deepspeed_config.py), checkpoints (checkpoints.py), the optimiser's groups and the
schedule (optim.py) and metrics.jsonl (metrics.py). The stages only launch it."""
