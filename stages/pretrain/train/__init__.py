"""Pretraining's worker side: the per-worker loop (loop.py), the DeepSpeed config (deepspeed_config.py),
checkpoints (checkpoints.py) and metrics.jsonl (metrics.py). What it shares with CapFilt's fine-tunes
(stages/capfilt/finetune.py) is the engine's: pipeline/precision.py, optim.py, deepspeed_setup.py."""
